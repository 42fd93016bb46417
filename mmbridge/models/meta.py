"""Models built without their weights, for FSDP (`train/fsdp.py`): parameters on the meta device, each
tagged with the safetensors file and key its values come from, so that every rank reads only the rows
of its own shards. The model is constructed under torch's `torch.device("meta")` context, as transformers'
`from_pretrained` constructs it; its buffers (rotary inverse frequencies, position ids) are then made real on
the CPU and computed as `from_pretrained` computes them (`initialize_weights`, which is a no-op on meta
parameters), and persistent ones found in the files are read from there. No function of torch, transformers or
peft is replaced.

Inside `meta_build()`, the Hugging Face loaders (`models/language.py`, `models/vision.py`) call
`pretrained_on_meta` instead of `from_pretrained`; everything else (bridges, CNN encoders) is built as
usual and sharded from its real values. Weights loaded later (`model.init`, a resumed checkpoint) are
tagged the same way where the parameter is still on the meta device (`defer_file`).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
from pathlib import Path

import torch
from torch import nn

SOURCES = "_weight_files"  # module attribute: {name relative to the module: (file, key)}
PENDING_DCP = "_weight_dcp"  # root attribute: (sharded checkpoint folder, names) loaded after the files

_BUILDING = contextvars.ContextVar("mmbridge_meta_build", default=False)


@contextlib.contextmanager
def meta_build():
    """Within: the pretrained Hugging Face parts are built on the meta device (see the module docstring)."""
    token = _BUILDING.set(True)
    try:
        yield
    finally:
        _BUILDING.reset(token)


def building() -> bool:
    return _BUILDING.get()


def has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def safetensors_files(folder: str) -> list[Path]:
    """The safetensors files of a Hugging Face folder (one file, or the shards an index names); [] if none."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def file_index(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key → (file, shape), reading only the files' headers."""
    from safetensors import safe_open

    found = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                found[key] = (str(f), tuple(fh.get_slice(key).get_shape()))
    return found


def read_rows(file: str, key: str, start: int = 0, count: int | None = None) -> torch.Tensor:
    """Rows [start, start + count) of `key` (all of it by default) in a safetensors file, in the file's dtype, on the
    CPU: safetensors' lazy `get_slice`. Its tensors are views of the file's memory map, which would keep the map,
    and every page of it touched, counted as the process's memory; so the rows are copied out and the file closed:
    a process maps at most one tensor's rows at a time and holds only the copy."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        part = fh.get_slice(key)
        shape = part.get_shape()
        if not shape:
            return fh.get_tensor(key).clone()
        count = shape[0] - start if count is None else count
        return part[start : start + count].clone()


def pretrained_on_meta(load_cls, path: str, **kwargs) -> tuple[nn.Module | None, str]:
    """`load_cls.from_pretrained(path, **kwargs)` on the meta device, each parameter tagged with its file;
    (None, why) when the folder has no safetensors whose names and shapes cover every parameter."""
    from transformers import AutoConfig, GenerationConfig, PreTrainedModel

    files = safetensors_files(path)
    if not files:
        return None, "no model.safetensors in the folder"
    concrete = isinstance(load_cls, type) and issubclass(load_cls, PreTrainedModel)
    config = (load_cls.config_class if concrete else AutoConfig).from_pretrained(path)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # a constructor's draws are discarded
        model = load_cls._from_config(config, **kwargs) if concrete else load_cls.from_config(config, **kwargs)
    _compute_buffers(model)
    index = file_index(files)
    prefix = getattr(model, "base_model_prefix", "") or ""
    sources = {}
    for name, p in model.named_parameters():  # tied parameters come once
        key = next((k for k in (name, f"{prefix}.{name}", name.removeprefix(prefix + ".")) if k in index), None)
        if key is None or index[key][1] != tuple(p.shape):
            why = "not in the files" if key is None else f"shaped {index[key][1]} in the files"
            return None, f"{name} is {why}"
        sources[name] = (index[key][0], key)
    persistent = set(model.state_dict(keep_vars=True)) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    _load_buffers(model, {n: index[n] for n in persistent if n in index})
    setattr(model, SOURCES, sources)
    model.eval()  # as from_pretrained returns it
    if model.can_generate() and (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model, ""


def try_meta(load_cls, path: str, what: str, **kwargs) -> nn.Module | None:
    """In a meta build, `pretrained_on_meta`, or None with a note that every process loads `what` whole;
    outside one, None."""
    if not building():
        return None
    model, why = pretrained_on_meta(load_cls, path, **kwargs)
    if model is None:
        print(f"{what}: {path}: {why}; every process loads these weights whole")
    return model


def submodule_of(model: nn.Module, name: str) -> nn.Module:
    """`model.<name>`, keeping the file tags of its tensors."""
    sub = model.get_submodule(name)
    tags = getattr(model, SOURCES, None)
    if tags:
        setattr(sub, SOURCES, {k[len(name) + 1 :]: v for k, v in tags.items() if k.startswith(name + ".")})
    return sub


def _compute_buffers(model: nn.Module) -> None:
    """Every buffer of `model` (built on the meta device) made real on the CPU and computed as `from_pretrained`
    computes the buffers it does not load: by the model's own `initialize_weights` (rotary frequencies, position
    ids), which leaves the meta parameters as they are. Its draws, if any, are discarded."""
    for name, buffer in list(model.named_buffers()):
        owner, leaf = owner_of(model, name)
        setattr(owner, leaf, torch.empty_like(buffer, device="cpu"))  # an existing buffer keeps its persistence
    with torch.random.fork_rng(devices=[]):
        model.initialize_weights()
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"meta build: buffers left on the meta device: {left[:5]}")


def _load_buffers(model: nn.Module, found: dict) -> None:
    from safetensors import safe_open

    for name, (file, _) in found.items():
        owner, leaf = owner_of(model, name)
        with safe_open(file, framework="pt") as fh:
            getattr(owner, leaf).copy_(fh.get_tensor(name))


def owner_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def sources(root: nn.Module) -> dict[str, tuple[str, str]]:
    """Every tagged tensor under `root` by its full name; a tag nearer the root wins (a resumed checkpoint
    over `model.init` over the pretrained files: later `defer_file` calls overwrite earlier ones)."""
    tagged = sorted(
        ((n, m) for n, m in root.named_modules() if getattr(m, SOURCES, None)),
        key=lambda nm: -nm[0].count(".") - bool(nm[0]),
    )
    out = {}
    for name, module in tagged:
        out.update({(f"{name}.{k}" if name else k): v for k, v in getattr(module, SOURCES).items()})
    return out


def defer_file(model: nn.Module, file: str, keys: list[str]) -> list[str]:
    """Tag `model`'s meta parameters among `keys` with `file` (a safetensors file keyed by `model`'s names);
    returns the keys that are real, which the caller loads as usual."""
    own = dict(model.named_parameters(remove_duplicate=False))
    lazy = [k for k in keys if k in own and own[k].is_meta]
    setattr(model, SOURCES, {**getattr(model, SOURCES, {}), **{k: (str(file), k) for k in lazy}})
    return [k for k in keys if k not in lazy]


def new_on(module: nn.Module, like: torch.Tensor) -> nn.Module:
    """A module that training adds to a built model (an MoE router, LaVIN's adapters), created and initialised on
    the CPU, moved to the device of `like` (a tensor of the part it joins). On the meta device (a model built for
    FSDP) it stays on the CPU and FSDP shards it from these values. So its initial values come from the CPU
    generator wherever it lives: one process, DDP and FSDP ranks, CPU or GPU draw the same."""
    return module if like.is_meta else module.to(like.device)


def former_name(root: nn.Module, name: str) -> str | None:
    """The name `name` (a tensor of `root`) had before a module that took over another's tensors replaced it:
    the MoE experts' copies of an FFN, the normalisation inside LaVIN's adapter. Such a module has a method
    `former_name(relative name)`, giving the name relative to the module it replaced (None if none)."""
    parts, module = name.split("."), root
    for i, part in enumerate(parts[:-1]):
        module = module._modules.get(part)
        if module is None:
            return None
        rename = getattr(module, "former_name", None)
        if callable(rename) and (rest := rename(".".join(parts[i + 1 :]))) is not None:
            return ".".join([*parts[: i + 1], rest])
    return None


def meta_copy(module: nn.Module) -> nn.Module:
    """`module`'s structure with every parameter and buffer on the meta device: nothing is copied but
    shapes, dtypes and `requires_grad`; parameters shared between modules stay shared."""
    memo = {}
    for _, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        empty = torch.empty(t.shape, dtype=t.dtype, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


def init_adapters(model: nn.Module, init_lora_weights=True) -> None:
    """Give the LoRA adapters that peft created on the meta device (`inject_adapter_in_model(...,
    low_cpu_mem_usage=True)`) their initial values: made real on the CPU in module order, each layer's own
    initialisation run (the draws peft's construction of them makes without `low_cpu_mem_usage`, so the values are
    those peft gives), then peft's `reset_lora_parameters`, all from the CPU generator; then put on the device and in the dtype of the layer they adapt,
    or left on the CPU where that layer is on the meta device (a model built for FSDP, which shards them from these
    values). The same for every build, so a meta build and a real one draw the same adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        weight = getattr(module.get_base_layer(), "weight", None)
        device = torch.device("cpu") if weight is None or weight.is_meta else weight.device
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
        holders = [getattr(module, a, None) for a in (*module.adapter_layer_names, *module.other_param_names)]
        holders = [h for h in holders if isinstance(h, (nn.ModuleDict, nn.ParameterDict))]
        made = []
        for holder in holders:
            for name in list(holder.keys()):
                item = holder[name]
                if isinstance(item, nn.Module) and has_meta(item):
                    item.to_empty(device="cpu")
                    for part in item.modules():  # the draws of the layers' own construction, as without
                        if hasattr(part, "reset_parameters"):  # low_cpu_mem_usage: the same initial values
                            part.reset_parameters()
                elif isinstance(item, nn.Parameter) and item.is_meta:
                    holder[name] = nn.Parameter(torch.empty_like(item, device="cpu"), requires_grad=item.requires_grad)
                else:
                    continue
                made.append(name)
        for name in dict.fromkeys(made):
            with torch.no_grad():
                module.reset_lora_parameters(name, init_lora_weights)
            for holder in holders:
                if name not in holder:
                    continue
                item = holder[name]
                if isinstance(item, nn.Module):
                    item.to(device=device, dtype=dtype)
                elif dtype is not None and item.is_floating_point():
                    holder[name] = nn.Parameter(item.detach().to(device, dtype), requires_grad=item.requires_grad)
                else:
                    holder[name] = nn.Parameter(item.detach().to(device), requires_grad=item.requires_grad)
