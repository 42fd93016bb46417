"""Sharded mid-stage checkpoints with `torch.distributed.checkpoint` (DCP), for runs under torchrun.

A sharded checkpoint folder holds DCP's files (`.metadata`, `__R_I.distcp`: every rank writes its
shards of the trained weights, the objective's state and the optimizer state, keyed by parameter
name), plus `meta.json` and `trainer_state.pt` like a single-process checkpoint, and the manifest.
DCP re-shards on load, so it resumes with any number of processes, one process included (where it
loads without a process group). Stage ends are written as ordinary, consolidated checkpoints and the
run's `model/` folder is always consolidated safetensors (what `load_run` reads).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmbridge.models.meta import PENDING_DCP, has_meta
from mmbridge.train import checkpoint as ckpt

warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / ".metadata").is_file()


def _saved_model_state(step: torch.nn.Module, keys: set[str]) -> dict:
    """The trained weights (`keys`, names in the bare model) and all of the objective's state."""
    state = get_model_state_dict(step)
    return {k: v for k, v in state.items() if k.startswith("objective.") or k[len("model.") :] in keys}


def save(
    run_dir: Path, step: torch.nn.Module, optimizer, keys: set[str], meta: dict, state: dict, keep: int, dist
) -> Path:
    """Every rank writes its shards into the temporary folder; rank 0 adds meta, trainer state and the
    manifest, renames the folder into place and prunes old checkpoints. Needs a filesystem all ranks share."""
    folder = ckpt.checkpoint_dir(run_dir, state["stage"], state["step"])
    tmp = Path(dist.broadcast(str(ckpt.unique_beside(folder, "tmp")) if dist.main else None))  # this save's own
    dist.barrier()
    dcp.save(
        {"model": _saved_model_state(step, keys), "optim": get_optimizer_state_dict(step, optimizer)},
        checkpoint_id=str(tmp),
    )
    dist.barrier()
    if dist.main:
        writers = {
            "meta.json": lambda p: p.write_text(json.dumps(meta, indent=2)),
            ckpt.STATE: lambda p: torch.save({**state, "sharded": True}, p),
        }
        ckpt.write_folder(folder, writers, filled=tmp)
        ckpt.prune_checkpoints(run_dir, folder, keep)
    dist.barrier()
    return folder


def load_weights(model: torch.nn.Module, folder: Path) -> dict:
    """Load a sharded checkpoint's trained weights into a freshly built, unwrapped model (every rank
    reads whole tensors; a model built for FSDP gets them once sharded); LoRA adapters and MoE experts are
    added first if the checkpoint has them."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    ckpt.restore_structure(model, meta)
    own = model.state_dict()
    missing = sorted(set(meta["keys"]) - set(own))
    if missing:
        raise KeyError(f"{folder}: checkpoint has parameters the model lacks: {missing[:5]}")
    if has_meta(model):  # built for FSDP: loaded into each rank's shards once they are filled (train/fsdp.py)
        setattr(model, PENDING_DCP, (Path(folder), list(meta["keys"])))
        return meta
    state = {"model." + k: own[k] for k in meta["keys"]}
    dcp.load({"model": state}, checkpoint_id=str(folder))
    model.load_state_dict({k[len("model.") :]: v for k, v in state.items()}, strict=False)
    return meta


def load_training_state(step: torch.nn.Module, optimizer, folder: Path) -> None:
    """The optimizer's and objective's state of a (possibly wrapped or sharded) `TrainStep`."""
    osd = get_optimizer_state_dict(step, optimizer)  # allocates AdamW's moments (a step with lr 0) to load into
    objective = {k: v for k, v in get_model_state_dict(step).items() if k.startswith("objective.")}
    dcp.load({"model": objective, "optim": osd}, checkpoint_id=str(folder))
    set_optimizer_state_dict(step, optimizer, osd)
    if objective:
        set_model_state_dict(step, objective, options=StateDictOptions(strict=False))


def restore(step: torch.nn.Module, optimizer, objective: torch.nn.Module, state: dict, folder: Path, dist) -> None:
    """A mid-stage resume's optimizer and objective state: from DCP shards, from a consolidated
    (single-process) checkpoint into an FSDP-sharded step (full tensors are split), or as before."""
    if state.get("sharded"):
        load_training_state(step, optimizer, folder)
    elif dist.enabled and dist.strategy == "fsdp":
        names = {id(p): n for n, p in step.named_parameters()}
        saved, osd = state["optimizer"], {"state": {}, "param_groups": []}
        for group, old in zip(optimizer.param_groups, saved["param_groups"]):
            fqns = [names[id(p)] for p in group["params"]]
            osd["param_groups"].append({**old, "params": fqns})
            osd["state"].update({n: saved["state"][i] for n, i in zip(fqns, old["params"]) if i in saved["state"]})
        full = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(step, optimizer, osd, options=full)
        if state["objective"]:
            set_model_state_dict(step, {"objective." + k: v for k, v in state["objective"].items()}, options=full)
    else:
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
