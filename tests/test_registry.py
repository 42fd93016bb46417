"""One registry mechanism (mmbridge/registry.py): the modules a registry names fill it at the first lookup, an
unknown name is refused with the choices, a name taken twice is refused, and the docs' example bridge works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmbridge.registry import Registry

DOCS = Path(__file__).resolve().parents[1] / "docs" / "guide" / "extending.md"


def test_a_registry_imports_its_modules_at_the_first_lookup_only():
    code = (
        "import sys\n"
        "from mmbridge.models.bridges import BRIDGES\n"
        "from mmbridge.objectives import OBJECTIVES\n"
        "from mmbridge.models.encoder import VISION_ENCODERS\n"
        "before = {m for m in sys.modules if m.startswith(('mmbridge.models.bridges.', 'mmbridge.objectives.'))}\n"
        "assert 'mmbridge.models.bridges.qformer' not in before and 'mmbridge.objectives.croc' not in before, before\n"
        "assert {'mlp', 'qformer', 'resampler', 'llama_vid', 'objects'} <= set(BRIDGES.names())\n"
        "assert {'lm', 'croc', 'lcl', 'lexical', 'concepts'} <= set(OBJECTIVES.names())\n"
        "assert {'hf', 'efficientnet_lite0', 'lcl_vit'} <= set(VISION_ENCODERS)\n"
        "assert 'mmbridge.models.bridges.qformer' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_unknown_and_twice_registered_names_are_refused():
    table: Registry[int] = Registry("widget")
    table.register("a")(int)
    table.register("a")(int)  # the same constructor again (a module imported twice): accepted
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        table.register("a")(float)
    with pytest.raises(ValueError, match=r"unknown widget 'b'; choose one of \['a'\]"):
        table.get("b")
    assert "a" in table and list(table) == ["a"]


def test_the_docs_example_bridge_registers_and_builds():
    from mmbridge.models.bridges import BRIDGES, build_bridge

    code = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    if "two_layer" not in BRIDGES:
        exec(compile(code, str(DOCS), "exec"), {})
    bridge = build_bridge({"name": "two_layer", "hidden": 8}, vision_dim=6, lm_dim=4, grid=(2, 3))
    assert bridge.num_tokens == 6 and bridge(torch.zeros(2, 6, 6)).shape == (2, 6, 4)
    with pytest.raises(ValueError, match=r"model.bridge \(two_layer\).*width"):
        build_bridge({"name": "two_layer", "width": 8}, vision_dim=6, lm_dim=4, grid=(2, 3))
