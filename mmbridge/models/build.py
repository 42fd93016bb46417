"""Build a composite model and its processor from a recipe's `model` section."""

from __future__ import annotations

from mmbridge.config import ModelConfig
from mmbridge.data.processor import Processor
from mmbridge.models.bridges import build_bridge
from mmbridge.models.checkpointing import enable_gradient_checkpointing
from mmbridge.models.language import IMAGE_TOKEN, load_language_model
from mmbridge.models.mmlm import MultimodalLM
from mmbridge.models.vision import build_vision_encoder


def build_model(cfg: ModelConfig, tokenizer=None) -> tuple[MultimodalLM, Processor]:
    """Vision encoder, LM and tokenizer from their sources; the bridge freshly initialised."""
    vision = build_vision_encoder(dict(cfg.vision))
    lm, tok = load_language_model(dict(cfg.lm))
    tok = tokenizer or tok
    bridge = build_bridge(dict(cfg.bridge), vision.hidden_size, lm.config.hidden_size, vision.grid,
                          in_tokens=vision.num_tokens)
    model = MultimodalLM(vision, bridge, lm, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    model.precision = getattr(cfg, "precision", "auto")
    if getattr(cfg, "gradient_checkpointing", False):
        enable_gradient_checkpointing(model)
    processor = Processor(tok, bridge.num_tokens, vision.image_size, vision.image_mean, vision.image_std,
                          max_length=cfg.max_length, system_prompt=cfg.system_prompt,
                          text_tokenizer=bridge.tokenizer, instructions=bridge.uses_instruction,
                          max_text_tokens=getattr(bridge, "max_text_tokens", 64))
    return model, processor
