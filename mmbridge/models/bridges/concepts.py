"""Concept tokens: a bridge's tokens read out as the LM's own words.

Visual concept detection (Fang et al., "From captions to visual concepts and back", 2015) learns a
detector per caption word from image-caption pairs alone, by multiple-instance learning: an image holds
a word if one of its regions does. Here the regions are a bridge's tokens and a word's detector is the
LM's own embedding of that word: a token's score for word w is <token, E[w]>, trained by the `concepts`
objective (objectives/concepts.py). What the LM then reads, per token (a cell of the pool-adapter's grid,
say) and for each of `slots` slots, is the embedding of one of the token's best words, weighted by its
detection probability, plus a learned slot embedding: text-like input the pretrained LM already binds and
reasons over, as it does a description. With `global_token`, the mean of the tokens is one more token
(for words about the whole image, such as a count).

The vocabulary (`word_ids`, LM token ids) is chosen from a stage's data by the `concepts` objective and
saved with the run. The words' weights come from the detectors; LM stages train the slot embeddings (and
the LM), not the detectors, which only the `concepts` objective trains.

Limits. It is a word bottleneck, not a continuous bridge: the LM reads only the vocabulary's word embeddings
(weighted), so what the vocabulary cannot name does not reach it. The vocabulary is whole words of one token
each, chosen from the concepts stage's answers: it names what that data talks about (the shapes world's colours,
shapes and places in the demo) and needs choosing again for other data. Words are detected per token of the
wrapped bridge, not per object, and carry no boxes or numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from mmbridge.models.bridges.base import BRIDGE_WRAPPERS, Bridge


@BRIDGE_WRAPPERS.register("concepts")
class ConceptTokens(Bridge):
    """Wraps a bridge: [B, T_in, D] → its T tokens (+1 global) → [B, (T + global) * slots, D_lm] word tokens."""

    reads_words = True  # the composite passes the LM's input-embedding table to forward
    run_buffers = ("word_ids",)  # saved with the trained weights

    def __init__(
        self, inner: Bridge, words: int = 32, slots: int = 4, global_token: bool = True, slot_std: float = 0.02
    ):
        super().__init__(inner.vision_dim, inner.lm_dim, inner.grid, False, inner.in_tokens)
        if inner.fusion != "early" or getattr(inner, "tokenizer", None) is not None or inner.uses_instruction:
            raise ValueError("concepts: the wrapped bridge must be an early-fusion bridge without its own text side")
        if not 1 <= slots <= words:
            raise ValueError(f"concepts: slots must be between 1 and words ({words}), got {slots}")
        self.inner, self.slots, self.global_token = inner, slots, bool(global_token)
        self.register_buffer("word_ids", torch.full((words,), -1, dtype=torch.long))
        self.slot_embed = nn.Parameter(torch.randn(self.regions, slots, inner.lm_dim) * slot_std)

    @property
    def regions(self) -> int:
        """Tokens the detectors score per image: the inner bridge's, plus the global one."""
        return self.inner.num_tokens + int(self.global_token)

    @property
    def num_tokens(self) -> int:
        return self.regions * self.slots

    @property
    def packable(self) -> bool:
        return getattr(self.inner, "packable", True)

    def regrid(self, grid, in_tokens) -> None:
        self.inner.regrid(grid, in_tokens)
        if self.inner.num_tokens + int(self.global_token) != self.slot_embed.shape[0]:
            raise ValueError(
                "concepts: the new grid changes the inner bridge's token count; the slot embeddings are per token"
            )
        super().regrid(grid, in_tokens)

    def set_vocabulary(self, ids: list[int]) -> None:
        if len(ids) != len(self.word_ids):
            raise ValueError(f"concepts: {len(self.word_ids)} words expected, got {len(ids)}")
        self.word_ids.copy_(torch.as_tensor(ids, dtype=torch.long))

    def regions_of(self, feats: torch.Tensor) -> torch.Tensor:
        """The tokens the detectors score: [B, regions, D_lm]."""
        tokens = self.inner(feats)
        if self.global_token:
            tokens = torch.cat([tokens, tokens.mean(1, keepdim=True)], 1)
        return tokens

    def scores(self, regions: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Detector logits [B, regions, V]: each region's dot product with each vocabulary word's embedding."""
        if bool((self.word_ids < 0).any()):
            raise RuntimeError("concepts: no vocabulary yet; a stage with the `concepts` objective chooses it")
        return regions @ words[self.word_ids].to(regions.dtype).T

    def project(self, feats: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        if words is None:
            raise ValueError("concepts: the LM's input-embedding table is needed (pass words=)")
        with torch.no_grad():  # the detectors train only under the concepts objective
            logits = self.scores(self.regions_of(feats), words)
        top = logits.topk(self.slots, dim=-1)  # [B, regions, slots]
        table = words[self.word_ids].to(self.slot_embed.dtype)
        tokens = table[top.indices] * torch.sigmoid(top.values)[..., None].to(table.dtype)
        return (tokens + self.slot_embed).flatten(1, 2)
