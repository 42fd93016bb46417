"""FSDP with no whole model on any rank (FSDP2 `fully_shard`, one unit per repeated block, the rest as root).

The model is built with its pretrained Hugging Face parts on the meta device (`models/meta.py`). A stage
shards a structure and then fills each rank's shards, rows [r * ceil(n / W), ...) of every tensor:

- the first stage a process trains reads those rows from the weight files (a part built for real, such as
  a fresh bridge, is sharded from its values), then the trained weights of a resumed sharded checkpoint;
- a later stage shards a meta copy of the previous stage's structure (LoRA adapters, MoE routers and LaVIN's
  adapters it adds come with their initial values) and takes over the previous stage's shards as they are:
  same mesh, same rows. MoE experts take copies of their FFN's shards, found by its former name.

So a rank holds its shards plus the units FSDP all-gathers for the computation, and a stage transition
moves no weights. The structure is copied; weights only where a shard must be re-padded or an FFN becomes
several experts.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from mmbridge.models import meta


class ShardedStages:
    """The sharded model across a run's stages: `structure` gives the module a stage sets up (its modes,
    LoRA), `shard` wraps and fills it, `trained_weights` and `unsharded` gather what is saved."""

    def __init__(self, device: torch.device, main: bool):
        self.device, self.main = device, main
        self.template: nn.Module | None = None  # the last sharded structure, on the meta device
        self.live: nn.Module | None = None  # the sharded TrainStep that holds the weights

    def structure(self, model: nn.Module) -> nn.Module:
        """The build itself for the first stage; afterwards a meta copy of the last stage's structure."""
        return model if self.live is None else meta.meta_copy(self.template)

    def shard(self, step: nn.Module, units: list[nn.Module], shard_fn) -> nn.Module:
        """`shard_fn` every unit and then `step` (a TrainStep), then fill the shards; returns `step`."""
        self.template = meta.meta_copy(step.model)
        for unit in units:
            shard_fn(unit)
        shard_fn(step)
        previous, self.live = self.live, step
        with torch.no_grad():
            if previous is None:
                fill_from_files(step, self.device)
                _load_pending_dcp(step)
            else:
                _take_over(step, previous)
        left = [n for n, t in [*step.named_parameters(), *step.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"FSDP: no weights for {len(left)} tensors of the sharded model: {left[:5]}")
        return step

    def trained_weights(self, keys: set[str]) -> dict[str, torch.Tensor]:
        """The trained weights `keys` (names in the bare model) whole, on the CPU of rank 0 ({} elsewhere),
        gathered one tensor at a time: never the frozen rest."""
        out = {}
        for name, p in self.live.named_parameters():
            key = name.removeprefix("model.")
            if name.startswith("model.") and key in keys:
                full = p.full_tensor() if isinstance(p, DTensor) else p
                if self.main:
                    out[key] = full.detach().cpu().contiguous().clone()
        return out

    def unsharded(self, part: str) -> nn.Module | None:
        """The model's `part` (e.g. `vit`) as a plain module with its trained weights, on rank 0's CPU
        (None elsewhere); every rank must call it."""
        prefix = f"model.{part}."
        tensors = {}
        for name, t in [*self.live.named_parameters(), *self.live.named_buffers()]:
            if name.startswith(prefix):
                full = t.full_tensor() if isinstance(t, DTensor) else t
                if self.main:
                    tensors[name[len(prefix) :]] = full.detach().cpu()
        if not self.main:
            return None
        module = meta.meta_copy(self.template.get_submodule(part)).to_empty(device="cpu")
        with torch.no_grad():  # tied parameters are one object here too, named once
            for name, t in [*module.named_parameters(), *module.named_buffers()]:
                t.copy_(tensors[name])
        return module


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _named(table: dict, name: str, root: nn.Module):
    """`table[name]`, or that of the name the tensor had before peft wrapped its layer in a LoRA layer
    (`base_layer`) or a module of `root` took it over (`meta.former_name`: MoE experts copy their FFN's,
    LaVIN's adapters keep their normalisation's)."""
    for candidate in (name, name.replace(".base_layer.", ".")):
        if candidate in table:
            return table[candidate]
        former = meta.former_name(root, candidate)
        if former is not None and (found := _named(table, former, root)) is not None:
            return found
    return None


def _aliases(root: nn.Module) -> dict[str, list[str]]:
    """For each parameter's first name, its other names (tied weights)."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[first[id(p)]].append(name)
        else:
            first[id(p)] = name
            out[name] = []
    return out


def _assign(root: nn.Module, name: str, value: torch.Tensor, aliases: list[str]) -> None:
    """Make `value` the parameter `name` (and its aliases). FSDP2 re-pads the shard and re-registers it
    (its post-load hook); a value laid out as FSDP keeps it is used without a copy."""
    owner, leaf = meta.owner_of(root, name)
    owner.load_state_dict({leaf: value}, strict=False, assign=True)
    new = getattr(owner, leaf)
    for alias in aliases:
        other, other_leaf = meta.owner_of(root, alias)
        other._parameters[other_leaf] = new


def _rows(p: torch.Tensor) -> tuple[int, int] | None:
    """This rank's rows (start, count) of a parameter FSDP2 shards on dim 0; None for any other layout."""
    if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),) or p.ndim == 0:
        return None
    n, world = p.shape[0], p.device_mesh.size()
    start, count = p.device_mesh.get_local_rank() * -(-n // world), p.to_local().shape[0]
    return (start, count) if count == max(0, min(-(-n // world), n - start)) else None


def _from_file(p: torch.Tensor, file: str, key: str, device: torch.device) -> torch.Tensor:
    """`p`'s local values read from a safetensors file: only this rank's rows where FSDP shards them."""
    rows = _rows(p)
    if rows is None:
        full = meta.read_rows(file, key).to(device=device, dtype=p.dtype)
        return distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full
    local = meta.read_rows(file, key, *rows).to(device=device, dtype=p.dtype)
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def fill_from_files(root: nn.Module, device: torch.device) -> None:
    """Give each meta parameter of `root` (sharded or not) its values from the file it is tagged with."""
    tags, aliases = meta.sources(root), _aliases(root)
    for name, p in list(root.named_parameters()):
        tag = _named(tags, name, root) if p.is_meta else None
        if tag is None:
            continue  # real already (sharded from its values), or reported as missing by the caller
        file, key = tag
        with torch.no_grad():
            _assign(root, name, _from_file(p, file, key, device), aliases[name])


def _load_pending_dcp(step: nn.Module) -> None:
    """The trained weights of a resumed sharded checkpoint, into the filled shards (DCP re-shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    pending = getattr(step.model, meta.PENDING_DCP, None)
    if pending is None:
        return
    folder, keys = pending
    wanted = {"model." + k for k in keys}
    state = {k: v for k, v in get_model_state_dict(step).items() if k in wanted}
    dcp.load({"model": state}, checkpoint_id=str(folder))
    set_model_state_dict(step, state, options=StateDictOptions(strict=False))
    delattr(step.model, meta.PENDING_DCP)


def _take_over(step: nn.Module, previous: nn.Module) -> None:
    """Fill `step`'s meta tensors with `previous`'s of the same name (or former name): its shards as they are when
    laid out alike (no copy), else re-distributed; the old storage is released once taken. A tensor several new
    ones copy (an FFN its MoE experts) is cloned for all but the last of them."""
    old_params, old_buffers = dict(previous.named_parameters()), dict(previous.named_buffers())
    aliases = _aliases(step)
    # new this stage and real already: LoRA adapters, MoE routers, LaVIN's adapters, the objective's parameters
    sources = {name: _named(old_params, name, step) for name, p in step.named_parameters() if p.is_meta}
    missing = [name for name, old in sources.items() if old is None]
    if missing:
        raise RuntimeError(f"FSDP: the previous stage's model has no {missing[:5]}")
    takers = Counter(id(old) for old in sources.values())
    for name, old in sources.items():
        p = step.get_parameter(name)
        takers[id(old)] -= 1
        last = takers[id(old)] == 0
        same = (
            isinstance(old, DTensor)
            and isinstance(p, DTensor)
            and old.placements == p.placements
            and old.device_mesh == p.device_mesh
            and old.to_local().shape == p.to_local().shape
            and old.dtype == p.dtype
        )
        if same:
            value = old.detach() if last else old.detach().clone()
        else:
            full = (old.full_tensor() if isinstance(old, DTensor) else old.detach()).to(p.dtype)
            value = distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full
        _assign(step, name, value, aliases[name])
        new_local, old_local = _local(step.get_parameter(name)), _local(old)
        if last and new_local.untyped_storage().data_ptr() != old_local.untyped_storage().data_ptr():
            old_local.untyped_storage().resize_(0)  # re-padded or re-distributed: the old shard is not kept
    for name, b in list(step.named_buffers()):
        old = _named(old_buffers, name, step)
        if b.is_meta and old is not None:
            owner, leaf = meta.owner_of(step, name)
            setattr(owner, leaf, old)
