"""Build a composite model and its processor from a recipe's `model` section."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from mmbridge.config import ModelConfig
from mmbridge.data.layouts import Tiling
from mmbridge.data.processor import Processor
from mmbridge.data.video import VideoSampling
from mmbridge.models.bridges import build_bridge
from mmbridge.models.checkpointing import enable_gradient_checkpointing
from mmbridge.models.feature_cache import FeatureCache
from mmbridge.models.language import IMAGE_TOKEN, load_language_model
from mmbridge.models.mmlm import MultimodalLM
from mmbridge.models.vision import build_vision_encoder
from mmbridge.models.weights import load_weights
from mmbridge.models.window_lora import add_window_lora


def build_model(cfg: ModelConfig, tokenizer=None) -> tuple[MultimodalLM, Processor]:
    """Vision encoder, LM and tokenizer from their sources; the bridge freshly initialised, or every trained
    weight from the run `cfg.init` names."""
    vision = build_vision_encoder(dict(cfg.vision))
    lm, tok = load_language_model(dict(cfg.lm))
    tok = tokenizer or tok
    bridge = build_bridge(
        bridge_options(cfg), vision.hidden_size, lm.config.hidden_size, vision.grid, in_tokens=vision.num_tokens
    )
    tiling = build_tiling(cfg, bridge, vision, lm.config.hidden_size)
    model = MultimodalLM(
        vision,
        bridge,
        lm,
        tok.convert_tokens_to_ids(IMAGE_TOKEN),
        precision=getattr(cfg, "precision", "auto"),
        tiling=tiling,
        feature_cache=FeatureCache() if getattr(cfg, "feature_cache", False) else None,
    )
    if getattr(cfg, "init", None):
        _load_init(model, cfg.init)
    if getattr(cfg, "gradient_checkpointing", False):
        enable_gradient_checkpointing(model)
    processor = Processor(
        tok,
        bridge.num_tokens,
        vision.image_size,
        vision.image_mean,
        vision.image_std,
        max_length=cfg.max_length,
        system_prompt=cfg.system_prompt,
        text_tokenizer=bridge.tokenizer,
        instructions=bridge.uses_instruction,
        max_text_tokens=getattr(bridge, "max_text_tokens", 64),
        modality_prefix=getattr(cfg, "modality_prefix", False),
        tiling=tiling,
        video=video_sampling(cfg, bridge),
    )
    return model, processor


def bridge_options(cfg: ModelConfig) -> dict:
    """`model.bridge`; under LLaVA-UHD's tiling a resampler without a `kind` is Qwen-VL's position-aware
    compressor (`kind: qwen`), which keys each slice by its own grid as UHD's shared compressor does."""
    options = dict(cfg.bridge)
    if dict(getattr(cfg, "tiling", None) or {}).get("mode") == "uhd" and options.get("name") == "resampler":
        options.setdefault("kind", "qwen")
    return options


def build_tiling(cfg: ModelConfig, bridge, vision, width: int) -> Tiling:
    """`model.tiling`, checked against the bridge; AnyRes's newline becomes the bridge's learned `image_newline`
    (LLaVA-NeXT), so it trains and is saved with the bridge."""
    tiling, image_size = Tiling.from_options(getattr(cfg, "tiling", None)), vision.image_size
    if not tiling.varies:
        return tiling
    if bridge.uses_instruction or getattr(bridge, "fusion", "early") == "deep":
        raise ValueError(
            f"model.tiling.mode={tiling.mode}: the {cfg.bridge.get('name')} bridge reads instructions "
            "or works in the LM's layers; tiling needs a bridge that maps each view alone"
        )
    tiling.check(image_size, bridge.num_tokens)
    tiling.patch = image_size // vision.grid[1]
    if tiling.mode == "uhd" and (
        cfg.bridge.get("name") != "resampler" or cfg.bridge.get("pos_embed") or not hasattr(vision, "forward_any")
    ):
        raise ValueError(
            "model.tiling.mode=uhd: each slice is encoded at its own size and compressed to one count; "
            "expected a ViT tower (hf or lcl_vit) and the resampler bridge without pos_embed"
        )
    if tiling.newline:
        bridge.image_newline = nn.Parameter(torch.randn(width) / width**0.5)
    if tiling.mode == "monkey":
        if getattr(cfg, "feature_cache", False):
            raise ValueError(
                "model.tiling.mode=monkey: each window has its own adapter; feature_cache keys on pixels "
                "alone (turn it off)"
            )
        add_window_lora(
            vision,
            tiling.windows[0] * tiling.windows[1],
            tiling.rank,
            tiling.alpha,
            tiling.targets,
            tiling.mlp_rank,
            tiling.dropout,
        )
    return tiling


def video_sampling(cfg: ModelConfig, bridge) -> VideoSampling:
    """`model.video` for this bridge: a whole video is one input of a bridge that reads videos, whose temporal
    embeddings must cover `max_frames`."""
    sampling = VideoSampling.from_options(getattr(cfg, "video", None), whole=bridge.reads_video)
    if bridge.reads_video and sampling.max_frames > bridge.max_frames:
        raise ValueError(
            f"model.video.max_frames={sampling.max_frames} exceeds the {cfg.bridge.get('name')} bridge's "
            f"temporal embeddings (model.bridge.max_frames={bridge.max_frames})"
        )
    return sampling


def _load_init(model: MultimodalLM, run_dir: str, seen: tuple[str, ...] = ()) -> None:
    """`model.init`: the run's trained weights (its LoRA adapters injected first) into the new build. A run that
    itself started from another (its own `model.init`) saved only what it trained: that one is loaded first."""
    folder = Path(run_dir) / "model"
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(
            f"model.init: {run_dir} is not a run directory with trained weights (no {folder / 'meta.json'})"
        )
    key = str(Path(run_dir).resolve())
    if key in seen:
        raise ValueError(f"model.init: the runs {' -> '.join(seen + (key,))} start from each other in a cycle")
    recipe = Path(run_dir) / "recipe.yaml"  # only its model.init is read here (runs.read_recipe is the whole reader)
    if not recipe.is_file():
        raise FileNotFoundError(f"model.init: {run_dir} is not a run directory (no {recipe})")
    parent = ((yaml.safe_load(recipe.read_text()) or {}).get("model") or {}).get("init")
    if parent:
        _load_init(model, parent, seen + (key,))
    load_weights(model, folder)
