"""lmms-eval integration: mmbridge runs as an lmms-eval model, and local lmms-eval tasks over LLaVA-format VQA files.

lmms-eval (an optional extra, `pip install --no-deps lmms-eval`) finds the model through the `lmms_eval.models`
entry point that pyproject.toml declares, which names `manifest` below: `--model mmbridge --model_args run=RUN`.
This module imports nothing heavy, since lmms-eval loads it while it builds its model registry.
"""

from __future__ import annotations

MODEL_ID = "mmbridge"
CHAT_CLASS = "mmbridge.interop.lmms.model.MMBridgeChat"
SIMPLE_CLASS = "mmbridge.interop.lmms.model.MMBridgeSimple"


def manifest():
    """The `lmms_eval.models` entry point: one model id with a chat class (lmms-eval's default) and a simple one
    (`--force_simple`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, chat_class_path=CHAT_CLASS, simple_class_path=SIMPLE_CLASS)
