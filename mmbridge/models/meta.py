"""Models built without their weights, for FSDP (`train/fsdp.py`): parameters on the meta device, each
tagged with the safetensors file and key its values come from, so that every rank reads only the rows
of its own shards. Buffers are built for real (rotary inverse frequencies, position ids): they are small
and computed by the constructors, not loaded.

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


@contextlib.contextmanager
def meta_parameters():
    """Every parameter registered inside lands on the meta device; buffers stay real. The CPU RNG is
    forked: a constructor's draws are discarded, as a real `from_pretrained` draws nothing."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        nn.Module.register_parameter = register


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


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class RowReader:
    """Rows of the tensors in one safetensors file, read with plain positional reads: a rank that reads its
    shard's rows maps no part of the file (a memory map would count every page touched, and its neighbours,
    as the process's memory)."""

    def __init__(self, file: str):
        self.file = open(file, "rb")
        size = int.from_bytes(self.file.read(8), "little")
        self.header, self.base = json.loads(self.file.read(size)), 8 + size

    def read(self, key: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Rows [start, start + count) of `key` (all of it by default), in the file's dtype, on the CPU."""
        entry = self.header[key]
        shape, dtype = entry["shape"], _DTYPES[entry["dtype"]]
        if not shape:
            start, count, shape = 0, 1, [1]
        count = shape[0] - start if count is None else count
        row = dtype.itemsize * int(torch.Size(shape[1:]).numel())
        out = torch.empty(count * row, dtype=torch.uint8)
        self.file.seek(self.base + entry["data_offsets"][0] + start * row)
        if self.file.readinto(out.numpy()) != count * row:
            raise OSError(f"{self.file.name}: {key} is truncated")
        return out.view(dtype).view(count, *shape[1:]) if entry["shape"] else out.view(dtype).view([])

    def close(self) -> None:
        self.file.close()


def pretrained_on_meta(load_cls, path: str, **kwargs) -> tuple[nn.Module | None, str]:
    """`load_cls.from_pretrained(path, **kwargs)` on the meta device, each parameter tagged with its file;
    (None, why) when the folder has no safetensors whose names and shapes cover every parameter."""
    from transformers import AutoConfig, GenerationConfig, PreTrainedModel

    files = safetensors_files(path)
    if not files:
        return None, "no model.safetensors in the folder"
    concrete = isinstance(load_cls, type) and issubclass(load_cls, PreTrainedModel)
    config = (load_cls.config_class if concrete else AutoConfig).from_pretrained(path)
    with meta_parameters():
        model = load_cls._from_config(config, **kwargs) if concrete else load_cls.from_config(config, **kwargs)
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


@contextlib.contextmanager
def adapters_off_meta(model: nn.Module):
    """peft moves new adapters to the device of the layer they adapt, so on a meta layer their initial values
    would be lost. Inside, each adapter of a meta layer is kept as initialised (on the CPU, in the layer's
    dtype) and put back when the injection is done."""
    if not has_meta(model):
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    move, made = BaseTunerLayer._move_adapter_to_device_of_base_layer, []

    def keep(self, adapter_name, device=None):
        weight = getattr(self.get_base_layer(), "weight", None)
        if weight is not None and weight.is_meta:
            for attr in [*self.adapter_layer_names, *self.other_param_names]:
                holder = getattr(self, attr, None)
                if isinstance(holder, nn.ModuleDict) and adapter_name in holder:
                    made.append((holder, adapter_name, copy.deepcopy(holder[adapter_name]).to(weight.dtype)))
                elif isinstance(holder, nn.ParameterDict) and adapter_name in holder:
                    value = holder[adapter_name]
                    made.append(
                        (
                            holder,
                            adapter_name,
                            nn.Parameter(value.detach().to(weight.dtype), requires_grad=value.requires_grad),
                        )
                    )
        move(self, adapter_name, device)

    BaseTunerLayer._move_adapter_to_device_of_base_layer = keep
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = move
    for holder, name, value in made:
        holder[name] = value
