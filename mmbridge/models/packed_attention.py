"""Packed rows without a dense mask: block-diagonal causal attention as a flex_attention `BlockMask`.

A dense [B, 1, T, T] mask costs O(T²) memory per row and keeps SDPA off its flash kernels. On a GPU,
packed rows instead give the LM a `BlockMask` (a query sees earlier keys of its own sample), and the
LM's attention goes through `packed_or_sdpa`: flex_attention (compiled) for a BlockMask, Hugging
Face's SDPA function, unchanged, for everything else (plain and Croc's mixed masks, generation).
`install` registers that function with transformers' attention registry (`AttentionInterface`) and
switches the LM to it with the public `set_attn_implementation` (on the first packed forward that takes
the block path; it stays for the LM's life, as gradient checkpointing's recompute must find it). On a GPU
`create_block_mask` is compiled the way torch documents (`torch.compile(create_block_mask)`). On the CPU the
dense SDPA path stays the default (flex_attention has no CPU backward); the block path can still
be asked for there, forward only, which is how tests compare the two.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "mmbridge_packed"  # the attention implementation name registered with transformers


@functools.cache
def _make_block_mask(cuda: bool):
    """`create_block_mask`, compiled on a GPU (torch's documented route; its private `_compile=` flag is deprecated),
    eager on a CPU."""
    return torch.compile(create_block_mask) if cuda else create_block_mask


@functools.cache
def _flex():
    """flex_attention, compiled once on a GPU (its fused kernel); the eager reference on a CPU."""
    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


def packed_block_mask(segment_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """[B, T] sample ids (0 for padding) → BlockMask: a query attends to keys at or before it of its own sample;
    a padding query attends to itself only (its output is never used, and no row is empty)."""
    seg = segment_ids
    valid = seg != 0 if attention_mask is None else attention_mask.bool()
    b, t = seg.shape

    def mask_mod(bi, h, q, kv):
        return ((kv <= q) & (seg[bi, q] == seg[bi, kv]) & valid[bi, kv]) | (q == kv)

    return _make_block_mask(seg.is_cuda)(mask_mod, b, None, t, t, device=seg.device)


def packed_or_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function: flex_attention for a BlockMask, SDPA otherwise."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if dropout and module.training:
        raise ValueError("packed attention through flex_attention has no attention dropout; set it to 0")
    gqa = query.shape[1] != key.shape[1]
    out = _flex()(
        query, key.to(query.dtype), value.to(query.dtype), block_mask=attention_mask, scale=scaling, enable_gqa=gqa
    )
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_or_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # 2D masks become the same masks as under sdpa


def _implementation(config) -> str | None:
    # transformers keeps the resolved implementation on the config under this name (read only here; it is set
    # with `set_attn_implementation`) and offers no public getter
    return getattr(config, "_attn_implementation", None)


def install(lm) -> bool:
    """Route `lm`'s attention through `packed_or_sdpa` if it uses SDPA (other implementations are kept);
    True if it now does. Done the first time a packed forward takes the block path, so a model that never
    does (every CPU run) keeps transformers' plain `sdpa` implementation."""
    text = getattr(lm.config, "text_config", None)
    configs = [c for c in (lm.config, text) if c is not None]
    if all(_implementation(c) == NAME for c in configs):
        return True
    if any(_implementation(c) != "sdpa" for c in configs):
        return False
    _register()
    # the model and its text part (a composite LM); any other sub-model (a vision tower) keeps its own
    lm.set_attn_implementation({"": NAME, **({"text_config": NAME} if text is not None else {})})
    return all(_implementation(c) == NAME for c in configs)
