"""The LCL pretraining model: our ViT + attentive pool feeding a small causal LM, its tokenizer and LM.

The losses (L_gen + λ·L_con) are the `lcl` objective's (`objectives/lcl.py`); the engine trains it
like any other stage (`lcl/task.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from mmbridge.lcl.sequence import EOI, PATCH, SOI, SpecialIds
from mmbridge.models.precision import autocast
from mmbridge.models.vit import LCLVisionTower

LLAMA_DEFAULTS = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 384,
    "max_position_embeddings": 1024,
}


def build_tokenizer(spec: str | dict, texts: list[str] | None = None):
    """`words`: a word-level vocabulary of `texts` (tiny, fast on CPU); else an HF tokenizer path or
    `{path, gguf_file}` (e.g. the packaged SmolLM2). `<soi>`, `<eoi>`, `<patch>` are added either way."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if spec == "words":
        from tokenizers import Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import WordLevel

        pre = pre_tokenizers.Whitespace()
        words = sorted({w.lower() for t in texts or [] for w, _ in pre.pre_tokenize_str(t)})
        vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *words])}
        core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
        core.normalizer, core.pre_tokenizer = normalizers.Lowercase(), pre
        tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    else:
        from mmbridge.models.language import _dequantised_gguf, resolve_path

        spec = {"path": spec} if isinstance(spec, str) else dict(spec)
        path = resolve_path(spec["path"])
        if spec.get("gguf_file"):
            path = _dequantised_gguf(path, spec["gguf_file"], None)
        tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": [SOI, EOI, PATCH]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_lm(cfg: dict, tokenizer) -> nn.Module:
    """An HF causal LM: `path` (any `AutoModelForCausalLM` folder) or a Llama built from `cfg`'s sizes."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = dict(cfg)
    cfg.pop("tokenizer", None)
    if "path" in cfg:
        from mmbridge.models.language import resolve_path

        lm = AutoModelForCausalLM.from_pretrained(resolve_path(cfg.pop("path")), dtype=torch.float32)
    else:
        lm = LlamaForCausalLM(
            LlamaConfig(
                **{**LLAMA_DEFAULTS, **cfg},
                vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=True,
            )
        )
    if lm.get_input_embeddings().num_embeddings < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer))
    return lm


class LCLModel(nn.Module):
    """Our ViT and a small causal LM: patch tokens fill the `<patch>` positions of the LM's input.

    Its trainable parts are `vision` (the ViT, with its attentive pool) and `lm`; the contrastive
    projection and temperature belong to the `lcl` objective (`objectives/lcl.py`)."""

    def __init__(self, vit: LCLVisionTower, lm: nn.Module, ids: SpecialIds, precision: str = "auto"):
        super().__init__()
        self.vit, self.lm, self.ids = vit, lm, ids
        width = lm.get_input_embeddings().embedding_dim
        if vit.config.out_dim != width:
            raise ValueError(f"vit.out_dim ({vit.config.out_dim}) must equal the LM width ({width})")
        self.precision = precision  # see models/precision.py

    @property
    def vision(self) -> LCLVisionTower:
        return self.vit

    @property
    def n_patches(self) -> int:
        return self.vit.config.grid**2

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def parts(self) -> dict[str, nn.Module]:
        return {"vision": self.vit, "lm": self.lm}

    def autocast(self):
        return autocast(self.precision, self.device)

    def hidden(self, input_ids, attention_mask, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
        """LM last hidden states [B, T, W] with patch positions filled, and the image latents [n, D]."""
        latent, tokens = self.vit(pixel_values)
        is_patch = input_ids == self.ids.patch
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_patch, 0))
        n_slots = int(is_patch.sum())
        if n_slots:
            if n_slots != tokens.shape[0] * tokens.shape[1]:
                raise ValueError(
                    f"{tokens.shape[0]} images x {tokens.shape[1]} patches do not fill {n_slots} patch positions"
                )
            embeds = embeds.masked_scatter(
                is_patch.unsqueeze(-1), tokens.to(embeds.dtype).reshape(-1, tokens.shape[-1])
            )
        h = self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return h, latent

    def soi_states(self, input_ids: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LM states at each `<soi>` (row-major = image order) and whether it has preceding context."""
        rows, cols = (input_ids == self.ids.soi).nonzero(as_tuple=True)
        return h[rows, cols], cols > 0
