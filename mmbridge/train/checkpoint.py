"""Run directories: trained weights as safetensors, the resolved recipe, tokenizer, trainer state.

Layout::

    RUN/recipe.yaml            the resolved recipe (what `load_run` rebuilds the model from)
    RUN/tokenizer/             the tokenizer, with the image token added
    RUN/model/model.safetensors  every parameter a stage trained (LoRA adapters unmerged)
    RUN/model/meta.json        which LoRA config was injected, and the stage reached
    RUN/checkpoints/last/      the same weights plus optimizer/scheduler/RNG state for --resume
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from mmbridge.config import Recipe, recipe_from_dict, recipe_to_dict


def trained_state(model: torch.nn.Module, keys: set[str]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: state[k].detach().contiguous().clone() for k in sorted(keys)}


def save_weights(model: torch.nn.Module, keys: set[str], folder: Path, meta: dict) -> None:
    """Write the trained parameters and their metadata atomically (temp folder, then rename)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trained_state(model, keys), str(tmp / "model.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_weights(model: torch.nn.Module, folder: Path) -> dict:
    """Load saved parameters into a freshly built model; every saved key must exist there."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("lora"):
        from mmbridge.models.language import add_lora

        if not any("lora_" in n for n, _ in model.named_parameters()):
            add_lora(model.lm, **meta["lora"])
    state = load_file(str(folder / "model.safetensors"))
    own = model.state_dict()
    missing = sorted(set(state) - set(own))
    if missing:
        raise KeyError(f"{folder}: checkpoint has parameters the model lacks: {missing[:5]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{folder}: {k} has shape {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model")
    model.load_state_dict(state, strict=False)
    return meta


def save_recipe(recipe: Recipe, run_dir: Path) -> None:
    (Path(run_dir) / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def read_recipe(run_dir: Path) -> Recipe:
    path = Path(run_dir) / "recipe.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no recipe.yaml)")
    return recipe_from_dict(yaml.safe_load(path.read_text()), where=str(path))


def rng_state() -> dict:
    """All RNG states as tensors and plain values, so `torch.load(weights_only=True)` reads them."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_trainer_state(folder: Path, state: dict) -> None:
    tmp = Path(folder) / "trainer_state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, Path(folder) / "trainer_state.pt")


def load_trainer_state(folder: Path) -> dict:
    return torch.load(Path(folder) / "trainer_state.pt", map_location="cpu", weights_only=True)


def load_run(run_dir: str | Path):
    """One call from a run directory back to `(model, processor)`, ready for eval or chat."""
    from transformers import AutoTokenizer

    from mmbridge.models.build import build_model

    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    tok_dir = run_dir / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir.exists() else None
    model, processor = build_model(recipe.model, tokenizer=tokenizer)
    load_weights(model, run_dir / "model")
    model.eval()
    return model, processor
