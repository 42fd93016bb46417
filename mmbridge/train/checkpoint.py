"""Run directories: trained weights as safetensors, the resolved recipe, tokenizer, trainer state.

Layout::

    RUN/recipe.yaml              the resolved recipe (what `load_run` rebuilds the model from)
    RUN/tokenizer/               the tokenizer, with the image token added
    RUN/model/model.safetensors  every parameter a stage trained (LoRA adapters unmerged)
    RUN/model/meta.json          which LoRA config was injected, and the stage reached
    RUN/model/manifest.json      size and sha256 of each file, checked on load
    RUN/checkpoints/stage{S}-step{N}/  the same three plus trainer_state.pt (optimizer, objective,
                                 RNG, data position) for --resume; the newest `keep_checkpoints` stay
    RUN/checkpoints.old-{date}-{time}/  an earlier run's checkpoints, set aside by a run without --resume

Every folder is written under a temporary name made for that one write, each file fsynced, then renamed
into place, so a crash leaves either the old folder or the new one; what a crash leaves is cleared by its
names only (`remove_partial`). Loading checks the manifest; a checkpoint that
fails the check is set aside (renamed `*.corrupt`) and the previous one is used. Weights are only
ever read from safetensors; trainer state with `torch.load(weights_only=True)`, which refuses to
unpickle anything but tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from mmbridge.config import Recipe
from mmbridge.models.weights import MANIFEST, CheckpointError, _sha256, load_weights, restore_structure, verify  # noqa: F401  (also imported from here)

STATE = "trainer_state.pt"
_NAME = re.compile(r"^stage(\d+)-step(\d+)$")
# what a killed save or prune leaves in RUN/checkpoints: a temp folder, a checkpoint renamed aside, a prune's
_PARTIAL = re.compile(r"^\.(stage\d+-step\d+)(\.[a-z0-9_]+)?\.(tmp|old|deleting)$")


# -- files ------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"format": 1, "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2))


def seal(folder: Path) -> None:
    """Fsync every file of a filled folder, write its manifest and fsync that and the folder (what a rename
    then publishes is whole on disk)."""
    folder = Path(folder)
    for p in folder.iterdir():
        _fsync(p)
    write_manifest(folder)
    _fsync(folder / MANIFEST)
    _fsync(folder)


def rename_new(src: Path, dst: Path) -> None:
    """Rename folder `src` to `dst`, which must not exist (FileExistsError if anything is there, nothing
    touched): `dst` is made empty first, then replaced by the rename, which the kernel refuses if it is not
    empty by then (the empty folder made here is then removed again; anything put into it stays)."""
    os.mkdir(dst)  # FileExistsError for anything there, an empty folder too
    try:
        os.rename(src, dst)
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(dst)  # only while empty
        raise


def unique_beside(folder: Path, suffix: str) -> Path:
    """A new empty folder `.NAME.<random>.<suffix>` beside `folder`, made for one call (never shared)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=f".{suffix}", dir=folder.parent))


def write_folder(folder: Path, writers: dict, filled: Path | None = None) -> None:
    """Write files (name -> fn(path)) into `folder` atomically: temp folder, fsync, manifest, rename.

    The temp folder is made for this call beside `folder` (`unique_beside`), or is `filled`: one the caller
    made and filled already (a sharded save's), whose files are kept and fsynced. An existing `folder` is
    replaced: one the run wrote itself (a checkpoint saved again, `model/` at a stage's end), renamed aside to
    a folder made for this call and deleted once the new one is in place, or renamed back on a failure.
    """
    folder = Path(folder)
    tmp, old = (Path(filled) if filled is not None else None), None
    try:
        if tmp is None:
            tmp = unique_beside(folder, "tmp")
        for p in tmp.iterdir():
            _fsync(p)
        for name, write in writers.items():
            write(tmp / name)
            _fsync(tmp / name)
        write_manifest(tmp)
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if folder.exists():
            old = unique_beside(folder, "old")
            folder.rename(old)  # onto the empty folder just made for it
        tmp.rename(folder)
        _fsync(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as e:  # safetensors reports its I/O errors as SafetensorError
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            old.rename(folder)
        elif old is not None:
            with contextlib.suppress(OSError):
                old.rmdir()  # the aside folder, if nothing was moved into it
        reason = f"{e.strerror} (errno {e.errno})" if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"could not write {folder}: {reason}") from e


# -- weights ----------------------------------------------------------------------------------
def trained_state(model: torch.nn.Module | dict, keys: set[str]) -> dict[str, torch.Tensor]:
    """The weights `keys` of `model` (a module, or a dict that holds them, e.g. gathered from FSDP shards)."""
    state = model if isinstance(model, dict) else model.state_dict()
    return {k: state[k].detach().cpu().contiguous().clone() for k in sorted(keys)}


def save_weights(
    model: torch.nn.Module | dict, keys: set[str], folder: Path, meta: dict, state: dict | None = None
) -> None:
    """Write the trained parameters, their metadata and (for checkpoints) trainer state atomically."""
    weights = trained_state(model, keys)
    writers = {
        "model.safetensors": lambda p: save_file(weights, str(p)),
        "meta.json": lambda p: p.write_text(json.dumps(meta, indent=2)),
    }
    if state is not None:
        writers[STATE] = lambda p: torch.save(state, p)
    write_folder(folder, writers)


# -- checkpoints ------------------------------------------------------------------------------
def checkpoint_dir(run_dir: Path, stage: int, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"stage{stage}-step{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders, newest (stage, step) first."""
    root = Path(run_dir) / "checkpoints"
    found = [(tuple(map(int, m.groups())), p) for p in root.glob("stage*") if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(run_dir: Path, model, keys: set[str], meta: dict, state: dict, keep: int) -> Path:
    """Write checkpoint (stage, step) from `state`, then delete all but the newest `keep`."""
    folder = checkpoint_dir(run_dir, state["stage"], state["step"])
    save_weights(model, keys, folder, meta, state)
    prune_checkpoints(run_dir, folder, keep)
    return folder


def prune_checkpoints(run_dir: Path, folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (just written: `folder`)."""
    try:
        for old in list_checkpoints(run_dir)[max(keep, 1) :]:
            doomed = old.with_name(f".{old.name}.deleting")  # renamed first: never a half-deleted checkpoint
            old.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    except OSError as e:
        raise CheckpointError(f"wrote {folder} but could not delete older checkpoints: {e}") from e


def load_trainer_state(folder: Path) -> dict:
    path = Path(folder) / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain values, "
            f"which are never unpickled ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def latest_checkpoint(run_dir: Path, say=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that passes its manifest check, with its trainer state.

    Each one that fails is reported, renamed to `<name>.corrupt` (kept for inspection, never
    loaded again) and the previous one is tried.
    """
    for folder in list_checkpoints(run_dir):
        try:
            verify(folder)
            return folder, load_trainer_state(folder)
        except CheckpointError as e:
            aside = folder.with_name(folder.name + ".corrupt")
            for k in itertools.count(2):  # an earlier `.corrupt` of the same name is kept too
                try:
                    rename_new(folder, aside)
                    break
                except FileExistsError:
                    aside = folder.with_name(f"{folder.name}.corrupt{k}")
            say(
                f"checkpoint {folder.name} is unusable and was moved to {aside.name}: {e}; "
                "trying the previous checkpoint"
            )
    return None


def set_aside(run_dir: Path) -> tuple[Path, int] | None:
    """Move an earlier run's checkpoints folder, whole, to a new `RUN/checkpoints.old-<date>-<time>` (never
    onto an earlier one, which stays as it is) and start an empty one; returns (where, how many checkpoints).
    Nothing moves when the folder holds no checkpoint of a run (`stageS-stepN`, `*.corrupt`)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir() or not any(
        _NAME.match(p.name.split(".")[0]) for p in root.iterdir() if not p.name.startswith(".")
    ):
        return None
    n = len(list_checkpoints(run_dir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in itertools.count(1):
        old = root.with_name(f"checkpoints.old-{stamp}" + (f"-{k}" if k > 1 else ""))
        try:
            rename_new(root, old)
            break
        except FileExistsError:
            continue
    root.mkdir()
    return old, n


def remove_partial(run_dir: Path) -> None:
    """Clear what a killed save or prune left in RUN/checkpoints, recognised by its names: temp folders
    (`.stageS-stepN.*.tmp`), a prune's `.stageS-stepN.deleting`, and a checkpoint renamed aside for a new one
    of the same name (`.stageS-stepN.*.old`: put back where the checkpoint is missing, else deleted). Nothing
    else is touched: a hidden file or folder of another name stays."""
    root = Path(run_dir) / "checkpoints"
    for p in sorted(root.glob(".*")):
        m = _PARTIAL.match(p.name)
        if m is None or not p.is_dir() or p.is_symlink():
            continue
        if m[3] == "old" and not (root / m[1]).exists():
            p.rename(root / m[1])
        else:
            shutil.rmtree(p, ignore_errors=True)


# -- run directory checks ---------------------------------------------------------------------
def _lora_bytes(module: torch.nn.Module, r: int, targets: list[str]) -> int:
    """The adapters a stage's LoRA adds, plus those the part already has (Monkey's per-window adapters)."""
    have = sum(p.numel() * p.element_size() for n, p in module.named_parameters() if "lora_" in n)
    return have + sum(
        r * (m.in_features + m.out_features) * 4
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


def estimate_checkpoint_bytes(model, recipe: Recipe) -> tuple[int, int]:
    """(bytes of one mid-stage checkpoint, bytes of the final weights): an upper-end estimate.

    Weights of every part any stage trains, plus AdamW's two moments for the largest stage.
    """
    parts = model.parts()
    size = {name: sum(p.numel() * p.element_size() for p in m.parameters()) for name, m in parts.items()}
    saved, largest = 0, 0
    seen: set[str] = set()
    for st in recipe.stages:
        stage_bytes = 0
        for part, mode in st.train.items():
            if mode == "full":
                n = size[part]
            elif mode == "lora":
                n = _lora_bytes(parts[part], st.lora.r, list(st.lora.target_modules))
            else:
                n = 0
            stage_bytes += n
            if n and part + mode not in seen:
                seen.add(part + mode)
                saved += n
        largest = max(largest, stage_bytes)
    return saved + 2 * largest + (1 << 20), saved + (1 << 20)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_run_dir(run_dir: Path) -> None:
    """Create `run_dir` and prove it writable (a small file written, fsynced and removed)."""
    run_dir = Path(run_dir)
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"run directory {run_dir} is not writable: {e.strerror or e} (errno {e.errno}); "
            "choose another --out or fix its permissions"
        ) from e


def check_free_space(run_dir: Path, checkpoint_bytes: int, final_bytes: int, keep: int) -> None:
    """Fail before training if the disk cannot hold `keep` checkpoints, one being written, and the weights."""
    need = checkpoint_bytes * (max(keep, 1) + 1) + final_bytes
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise CheckpointError(
            f"run directory {run_dir}: {_human(free)} free, but training needs about {_human(need)} "
            f"({max(keep, 1)} checkpoint(s) of ~{_human(checkpoint_bytes)} kept (keep_checkpoints={keep}), one "
            f"being written, and the final weights); free space, lower keep_checkpoints or choose another --out"
        )


# -- recipe, RNG, whole runs ------------------------------------------------------------------
def rng_state() -> dict:
    """The CPU-side RNG states (torch, numpy, Python) as tensors and plain values, so
    `torch.load(weights_only=True)` reads them; the trainer adds every CUDA device's under `cuda`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
