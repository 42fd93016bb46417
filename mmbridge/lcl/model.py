"""The LCL pretraining model: our ViT + attentive pool feeding a small causal LM, and the two losses.

Loss = gen_weight · L_gen + λ · L_con. L_gen: next-token cross-entropy on text targets, normalised by
the text targets of the whole (all-process) batch; its gradient reaches the ViT through the patch
tokens. L_con: InfoNCE between the image latent and the projected LM state at that image's `<soi>`,
which has seen only the preceding context; an image whose `<soi>` is at position 0 has none and is
skipped. Under several processes, the returned `loss` is scaled so that averaging gradients over
processes (DDP's convention) gives the gradient of the global loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmbridge.lcl.loss import ContrastiveHead, world_size
from mmbridge.lcl.sequence import EOI, IGNORE, PATCH, SOI, SpecialIds
from mmbridge.models.vit import LCLVisionTower

LLAMA_DEFAULTS = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "intermediate_size": 384, "max_position_embeddings": 1024}


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
        lm = LlamaForCausalLM(LlamaConfig(**{**LLAMA_DEFAULTS, **cfg}, vocab_size=len(tokenizer),
                                          pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True))
    if lm.get_input_embeddings().num_embeddings < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer))
    return lm


@dataclass
class LCLOutput:
    loss: torch.Tensor  # what to backpropagate (scaled for gradient averaging across processes)
    terms: dict  # gen, con (global values), scale, images (with context, all processes), targets


class LCLModel(nn.Module):
    def __init__(self, vit: LCLVisionTower, lm: nn.Module, ids: SpecialIds):
        super().__init__()
        self.vit, self.lm, self.ids = vit, lm, ids
        width = lm.get_input_embeddings().embedding_dim
        if vit.config.out_dim != width:
            raise ValueError(f"vit.out_dim ({vit.config.out_dim}) must equal the LM width ({width})")
        self.head = ContrastiveHead(width, vit.config.out_dim)

    @property
    def n_patches(self) -> int:
        return self.vit.config.grid ** 2

    def hidden(self, input_ids, attention_mask, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
        """LM last hidden states [B, T, W] with patch positions filled, and the image latents [n, D]."""
        latent, tokens = self.vit(pixel_values)
        is_patch = input_ids == self.ids.patch
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_patch, 0))
        n_slots = int(is_patch.sum())
        if n_slots:
            if n_slots != tokens.shape[0] * tokens.shape[1]:
                raise ValueError(f"{tokens.shape[0]} images x {tokens.shape[1]} patches do not fill "
                                 f"{n_slots} patch positions")
            embeds = embeds.masked_scatter(is_patch.unsqueeze(-1), tokens.to(embeds.dtype).reshape(-1, tokens.shape[-1]))
        h = self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return h, latent

    def soi_states(self, input_ids: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LM states at each `<soi>` (row-major = image order) and whether it has preceding context."""
        rows, cols = (input_ids == self.ids.soi).nonzero(as_tuple=True)
        return h[rows, cols], cols > 0

    def forward(self, batch: dict, lambda_con: float = 0.1, gen_weight: float = 1.0) -> LCLOutput:
        ids, labels = batch["input_ids"], batch["labels"]
        h, latent = self.hidden(ids, batch["attention_mask"], batch["pixel_values"])
        targets = labels[:, 1:]
        keep = targets != IGNORE
        counts = torch.stack([keep.sum(), torch.zeros((), dtype=torch.long)])
        state, valid = self.soi_states(ids, h)
        if state.shape[0] != latent.shape[0]:
            raise ValueError(f"{state.shape[0]} <soi> tokens but {latent.shape[0]} images")
        counts[1] = valid.sum()
        if world_size() > 1:
            dist.all_reduce(counts)
        n_targets = max(int(counts[0]), 1)
        if gen_weight:
            logits = self.lm.get_output_embeddings()(h[:, :-1][keep])
            gen_share = F.cross_entropy(logits.float(), targets[keep], reduction="sum") / n_targets
        else:
            gen_share = h.sum() * 0.0
        con = self.head(latent, state, valid) if lambda_con else h.sum() * 0.0
        loss = world_size() * gen_weight * gen_share + lambda_con * con
        gen = gen_share.detach().clone()
        if world_size() > 1:
            dist.all_reduce(gen)
        terms = {"gen": float(gen), "con": float(con.detach()), "scale": float(self.head.scale.detach()),
                 "images": int(counts[1]), "targets": int(counts[0])}
        return LCLOutput(loss, terms)

    @torch.no_grad()
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit contrastive features of text-only sequences ending in `<soi>` (retrieval's text side)."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        h = self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        state, _ = self.soi_states(input_ids, h)
        return F.normalize(self.head.proj(state).float(), dim=-1)
