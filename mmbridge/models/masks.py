"""4D additive attention masks for a decoder LM (SDPA): causal with bidirectional blocks.

Croc's mixed attention comes in two forms:
- `prefix`: every position before a sample's first answer token attends bidirectionally within
  that prefix (Croc's released code); the answer and everything after it stay causal.
- `visual`: bidirectional only among the tokens of one image; all text stays causal.
`causal` is the plain mask. Padding keys are always blocked, and since answer tokens are never
in a bidirectional block, no position sees a later answer token. With `segment_ids` (packed rows:
several samples per row, numbered 1, 2, … and 0 for padding) attention is block-diagonal: a
position sees only its own sample, and each mode applies per sample. Built for the whole batch at
once; the result is [B, 1, T, T] with 0 where attention is allowed and the dtype's minimum
elsewhere (additive masks are exact under both SDPA and eager attention; boolean ones are not).
"""

from __future__ import annotations

import torch

from mmbridge.data.processor import IGNORE

MODES = ("causal", "prefix", "visual")


def first_answer_position(labels: torch.Tensor) -> torch.Tensor:
    """Index of each row's first labelled token; the row length when it has none. [B, T] → [B]."""
    has = labels != IGNORE
    first = has.int().argmax(dim=1)
    return torch.where(has.any(dim=1), first, torch.full_like(first, labels.shape[1]))


def image_spans(is_image: torch.Tensor, tokens_per_image: int | torch.Tensor) -> torch.Tensor:
    """Which image each position belongs to (-1 for text): image tokens are grouped in order, as the model
    fills them, `tokens_per_image` at a time (0, 1, … per row), or by each image's own count (a tensor
    [n_images] of the batch's images in row-major order; numbered across the batch)."""
    if torch.is_tensor(tokens_per_image):
        ordinal = is_image.long().flatten().cumsum(0).reshape(is_image.shape) - 1
        ends = tokens_per_image.to(is_image.device).cumsum(0)
        span = torch.searchsorted(ends, ordinal, right=True)
    else:
        span = (is_image.long().cumsum(dim=1) - 1) // tokens_per_image
    return torch.where(is_image, span, torch.full_like(span, -1))


def segment_first_answer(labels: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """For each position, the first labelled position of its own segment (the row length when it has none)."""
    b, t = labels.shape
    pos = torch.arange(t, device=labels.device).expand(b, t)
    first = torch.full((b, t + 1), t, dtype=torch.long, device=labels.device)
    first.scatter_reduce_(1, segment_ids, torch.where(labels != IGNORE, pos, t), reduce="amin")
    return first.gather(1, segment_ids)


def allowed_attention(
    attention_mask: torch.Tensor,
    mode: str = "causal",
    labels: torch.Tensor | None = None,
    is_image: torch.Tensor | None = None,
    tokens_per_image: int | torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [B, T, T] (query, key): True where a query may attend to a key."""
    if mode not in MODES:
        raise ValueError(f"attention mode {mode!r}: expected one of {MODES}")
    b, t = attention_mask.shape
    pos = torch.arange(t, device=attention_mask.device)
    allowed = (pos[None, :] <= pos[:, None]).expand(b, t, t)  # causal
    if mode == "prefix":
        if labels is None:
            raise ValueError("prefix attention needs the labels (to find the first answer token)")
        # inside the prefix everything sees everything; a query at or after the first answer
        # token already sees the whole prefix causally
        if segment_ids is None:
            allowed = allowed | (pos[None, None, :] < first_answer_position(labels)[:, None, None])
        else:  # the key lies in its own sample's prefix (the segment check below keeps samples apart)
            allowed = allowed | (pos < segment_first_answer(labels, segment_ids))[:, None, :]
    elif mode == "visual":
        if (
            is_image is None
            or tokens_per_image is None
            or (not torch.is_tensor(tokens_per_image) and not tokens_per_image)
        ):
            raise ValueError("visual attention needs is_image and tokens_per_image")
        span = image_spans(is_image, tokens_per_image)
        same = (span[:, :, None] == span[:, None, :]) & is_image[:, :, None] & is_image[:, None, :]
        allowed = allowed | same
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return allowed & attention_mask.bool()[:, None, :]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean [B, T, T] → additive float [B, 1, T, T] (0 = attend, dtype minimum = blocked)."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def mixed_attention_mask(
    attention_mask: torch.Tensor,
    mode: str,
    labels: torch.Tensor | None = None,
    is_image: torch.Tensor | None = None,
    tokens_per_image: int | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Croc's mixed attention as a 4D additive mask for `lm.get_decoder()(attention_mask=...)`."""
    return additive_mask(
        allowed_attention(attention_mask, mode, labels, is_image, tokens_per_image, segment_ids), dtype
    )
