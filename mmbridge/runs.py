"""A run directory, read back: its recipe (RUN/recipe.yaml) and its trained model with the processor.

RUN/recipe.yaml      the recipe as trained (save_recipe / read_recipe)
RUN/tokenizer/       the tokenizer (with the image token)
RUN/model/           the trained weights and meta.json (what training added: LoRA, MoE, adapters, resolution)
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mmbridge.config import Recipe, recipe_from_dict, recipe_to_dict
from mmbridge.device import resolve_device
from mmbridge.models.weights import CheckpointError, load_weights


def save_recipe(recipe: Recipe, run_dir: Path) -> None:
    (Path(run_dir) / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def read_recipe(run_dir: Path) -> Recipe:
    """The recipe a run directory was trained with (RUN/recipe.yaml)."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no recipe.yaml)")
    return recipe_from_dict(yaml.safe_load(path.read_text()), where=str(path))


def load_run(run_dir: str | Path, device: str = "auto"):
    """One call from a run directory back to `(model, processor)`, ready for eval or chat on `device`
    (`auto`: the GPU when there is one; see `device.py`)."""
    from transformers import AutoTokenizer

    from mmbridge.models.build import build_model
    from mmbridge.models.resolution import sync_processor

    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    if recipe.kind != "lmm":
        raise CheckpointError(
            f"{run_dir}: a kind {recipe.kind!r} run; what it trained is the encoder in "
            f"{run_dir / recipe.export} (use it as model.vision {{name: lcl_vit, path: ...}})"
        )
    target = resolve_device(device)
    tok_dir = run_dir / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir.exists() else None
    model, processor = build_model(recipe.model, tokenizer=tokenizer)
    load_weights(model, run_dir / "model")
    sync_processor(model, processor)
    model.to(target).eval()
    return model, processor
