"""A run's trained weights on disk: the manifest check, and loading them into a freshly built model (with what
training added to its structure first). Saving, checkpoints and resume are in `train/checkpoint.py`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmbridge.models.meta import defer_file, has_meta

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint or run directory that cannot be written or read; the message says which and why."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(folder: Path) -> None:
    """Raise CheckpointError unless every file in the manifest is there with its size and hash."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST} (written last, so the save never finished)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}/{MANIFEST}: unreadable ({e})") from None
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{path}: truncated or altered: {size} bytes, the manifest says {want['bytes']}")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path}: corrupt: its sha256 differs from the manifest's")


def restore_structure(model: torch.nn.Module, meta: dict) -> None:
    """What training added to the LM before its weights were saved: LoRA, MoE experts (MoE-tuning), LaVIN's MMA."""
    if meta.get("lora") and not any("lora_" in n for n, _ in getattr(model, "lm", model).named_parameters()):
        from mmbridge.models.language import add_lora

        add_lora(model.lm, **meta["lora"])
    if meta.get("moe"):
        from mmbridge.models.moe import add_moe, has_moe

        if not has_moe(model.lm):
            add_moe(model.lm, **meta["moe"])
    size = meta.get("image_size")
    if size and hasattr(model, "set_image_size") and size != model.vision.image_size:
        model.set_image_size(size)  # a stage changed the resolution: the saved position table has the new size
    if meta.get("mma"):
        from mmbridge.models.mma import add_mma, add_vision_mma, has_mma, has_vision_mma, vision_kind

        cfg = dict(meta["mma"])
        kind = vision_kind(cfg.pop("vision", False), saved=True)  # a bare true: saved before the router existed
        if kind and not has_vision_mma(model.vision):
            add_vision_mma(model.vision, cfg["dim"], cfg["groups"], cfg["dropout"], kind, cfg["temperature"])
        if not has_mma(model.lm):
            if "groups" not in meta["mma"]:
                raise ValueError(
                    "this run's LaVIN adapters are the older two-path SiLU form, which this version no "
                    "longer builds (it follows LaVIN's RepAdapter router now); retrain the mma stage"
                )
            add_mma(model.lm, **cfg)


def load_weights(model: torch.nn.Module, folder: Path) -> dict:
    """Load saved parameters into a freshly built model; every saved key must exist there."""
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        verify(folder)
    meta = json.loads((folder / "meta.json").read_text())
    restore_structure(model, meta)
    file = folder / "model.safetensors"
    if has_meta(model):  # built for FSDP: what lands on meta parameters is read per shard when sharded
        with safe_open(str(file), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            state = {k: fh.get_tensor(k) for k in defer_file(model, str(file), list(shapes))}
    else:
        state = load_file(str(file))
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(shapes) - set(own))
    if missing:
        raise KeyError(f"{folder}: checkpoint has parameters the model lacks: {missing[:5]}")
    for k, shape in shapes.items():
        if tuple(own[k].shape) != shape:
            raise ValueError(f"{folder}: {k} has shape {shape} in the checkpoint, {tuple(own[k].shape)} in the model")
    model.load_state_dict(state, strict=False)
    return meta
