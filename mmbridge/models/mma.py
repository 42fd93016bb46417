"""LaVIN's mixture-of-modality adaptation (MMA): light adapters in the LM, mixed by the input's modality.

In every decoder layer the normalised input of attention and of the FFN gets an adapter: two down-up paths
(d → dim → d, the up-projections start at zero, so the adapted LM starts equal to the plain one) whose outputs are
mixed by a router. The router reads a learned modality token: one embedding for text-only samples, one for samples
with an image, so the two kinds of input take different mixtures of the same paths. Which samples hold an image is
told by the composite model before each forward (`mark`), per row or, for packed rows, per sample.

The adapters and modality tokens are created on the CPU (`meta.new_on`): under FSDP, where the LM is on the meta
device, they are sharded from the values one process would give them, and the wrapped normalisation keeps its
shards (`former_name`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.models.meta import new_on

PLACES = {"attention": "input_layernorm", "ffn": "post_attention_layernorm"}


class Modality(nn.Module):
    """The LM's modality tokens (0: text only, 1: with an image) and the current forward's modality per token."""

    def __init__(self, hidden: int):
        super().__init__()
        self.tokens = nn.Embedding(2, hidden)
        nn.init.normal_(self.tokens.weight, std=1.0)
        self.current: torch.Tensor | None = None  # [B, T] or [B, 1] of 0/1

    def embedding(self, like: torch.Tensor) -> torch.Tensor:
        if self.current is None:
            raise RuntimeError("MMA adapters: the forward's modality was not marked (MultimodalLM does it)")
        return self.tokens(self.current.to(like.device)).to(like.dtype)


class ModalityAdapter(nn.Module):
    """A normalisation followed by `h + Σ_i w_i · up_i(silu(down_i(h)))`, w = softmax(router(modality) / τ)."""

    def __init__(self, norm: nn.Module, hidden: int, dim: int, temperature: float, modality: Modality):
        super().__init__()
        self.norm, self.temperature = norm, temperature
        weight = next(norm.parameters())
        kw = {"dtype": weight.dtype}  # drawn on the CPU, then moved to the norm's device (`new_on`)
        self.down = new_on(nn.ModuleList(nn.Linear(hidden, dim, **kw) for _ in range(2)), weight)
        self.up = nn.ModuleList(nn.Linear(dim, hidden, **kw) for _ in range(2))
        for up in self.up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.up = new_on(self.up, weight)
        self.router = new_on(nn.Linear(hidden, 2, **kw), weight)
        self._modality = [modality]  # shared by every adapter of the LM, registered once on the LM

    @staticmethod
    def former_name(name: str) -> str | None:
        """The name the tensor `name` (relative to this module) had in the normalisation it wraps."""
        return name.removeprefix("norm.") if name.startswith("norm.") else None

    def weights(self, like: torch.Tensor) -> torch.Tensor:
        """Router weights [B, T or 1, 2] for the marked modality."""
        return F.softmax(self.router(self._modality[0].embedding(like)) / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        w = self.weights(h)
        paths = [up(F.silu(down(h))) for down, up in zip(self.down, self.up)]
        return h + w[..., :1] * paths[0] + w[..., 1:] * paths[1]


def add_mma(lm: nn.Module, dim: int = 8, temperature: float = 10.0, where=("attention", "ffn")) -> int:
    """Put a ModalityAdapter after the chosen norms of every decoder layer of `lm`, in place; returns the count."""
    bad = [w for w in where if w not in PLACES]
    if bad or not where:
        raise ValueError(f"mma.where: expected a non-empty list of {sorted(PLACES)}, got {list(where)!r}")
    hidden = lm.get_input_embeddings().embedding_dim
    decoder = lm.get_decoder()
    modality = new_on(Modality(hidden), lm.get_input_embeddings().weight)
    lm.mma_modality = modality
    count = 0
    for layer in decoder.layers:
        for place in where:
            norm = getattr(layer, PLACES[place], None)
            if norm is None:
                raise ValueError(f"mma: {type(layer).__name__} has no {PLACES[place]} to adapt")
            setattr(layer, PLACES[place], ModalityAdapter(norm, hidden, dim, temperature, modality))
            count += 1
    return count


def has_mma(lm: nn.Module) -> bool:
    return isinstance(getattr(lm, "mma_modality", None), Modality)


def mark(lm: nn.Module, is_image: torch.Tensor, segment_ids: torch.Tensor | None = None) -> None:
    """Tell the LM's adapters which tokens belong to a sample with an image: per row, or per packed sample."""
    if not has_mma(lm):
        return
    if segment_ids is None:
        lm.mma_modality.current = is_image.any(dim=1, keepdim=True).long()
        return
    n = int(segment_ids.shape[1]) + 1  # segment ids are below the row width: no read-back for a max
    has = torch.zeros(segment_ids.shape[0], n, dtype=torch.long, device=segment_ids.device)
    has.scatter_reduce_(1, segment_ids, is_image.long(), reduce="amax")
    lm.mma_modality.current = has.gather(1, segment_ids)


def is_mma_param(name: str) -> bool:
    """What `lm: mma` trains: the adapters' paths and routers and the modality tokens."""
    return "mma_modality." in name or any(f"{norm}.{k}." in name for norm in PLACES.values()
                                          for k in ("down", "up", "router"))
