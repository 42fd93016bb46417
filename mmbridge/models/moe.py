"""MoE-tuning (MoE-LLaVA): the LM's feed-forward layers become a mixture of experts.

Each chosen decoder layer's FFN is copied into E experts, so the converted model starts out computing what the
dense one did. A router (Linear d → E, no bias) scores every token, image and text alike; a token goes through its
top-k experts and their outputs are summed with the top-k router probabilities renormalised to sum to 1. Dispatch
is batched: tokens are sorted by expert and each expert runs once on its contiguous slice (a loop over the E
experts, none over tokens; an expert without tokens runs on an empty slice, so DDP and FSDP see every expert
take part on every rank). Every forward leaves the layer's `tally` of its non-padding tokens, from which the
Switch-Transformer balancing loss is computed (`aux_loss`; over all ranks' tokens with `balancing_over`).

Under FSDP the experts are copied from a layer on the meta device: they hold no values until the layer is
sharded, and then each takes the FFN's shards (`former_name` tells `train/fsdp.py` whose).
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from mmbridge.models.meta import new_on

LAYER_CHOICES = ("all", "every_other")


class MoEFeedForward(nn.Module):
    """Top-k routed experts in place of one FFN; `tally` holds what the last forward adds to the balancing loss."""

    def __init__(self, ffn: nn.Module, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        if num_experts < 2 or not 1 <= top_k <= num_experts:
            raise ValueError(f"moe: need experts >= 2 and 1 <= top_k <= experts, got {num_experts} and {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.experts = nn.ModuleList(copy.deepcopy(ffn) for _ in range(num_experts))
        weight = next(ffn.parameters())
        self.router = nn.Linear(hidden_size, num_experts, bias=False, dtype=weight.dtype)  # drawn on the CPU
        nn.init.normal_(self.router.weight, std=0.02)
        self.router = new_on(self.router, weight)
        self.real: torch.Tensor | None = None  # [N] 1 for a token, 0 for padding, set by `mark` before a forward
        self.tally: torch.Tensor | None = None  # the last forward's [2E + 1]: see `tally`

    @staticmethod
    def former_name(name: str) -> str | None:
        """What the tensor `name` (relative to this module) was a copy of in the FFN it replaced."""
        found = re.fullmatch(r"experts\.\d+\.(.+)", name)
        return found.group(1) if found else None

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[N, d] → router probabilities [N, E] (fp32), chosen experts [N, k], renormalised weights [N, k]."""
        probs = self.router(h).float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return probs, chosen, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1])
        probs, chosen, weights = self.route(h)
        flat = chosen.reshape(-1)  # [N*k]: token t's j-th choice at t*k + j
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        token = order // self.top_k
        slices = h[token].split(counts.tolist())  # one read-back per layer: the slice sizes
        # every expert runs, on an empty slice too, so each gets a gradient (zeros) on every rank: DDP needs no
        # unused-parameter search, and FSDP's reduce-scatter, which takes the gradients a rank has, lines up
        # (measured: skipping empty experts silently mixed two experts' gradients across 2 FSDP ranks)
        out = torch.cat([expert(s) for expert, s in zip(self.experts, slices)])
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        y = torch.zeros_like(h).index_add_(0, token, out)
        real = self.real if self.real is not None and self.real.numel() == h.shape[0] else None
        self.tally = tally(probs, chosen, real)
        return y.reshape(x.shape)


def tally(probs: torch.Tensor, chosen: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """What the balancing loss needs from one forward, as sums (so ranks can add theirs): per expert the
    assignments to it and its router probabilities, then the token count ([2E + 1], fp32; the probabilities keep
    their graph), over the tokens `real` marks (all without it). A mask, not a selection: the shapes do not
    depend on it, so a recomputed (gradient-checkpointed) forward saves the same tensors."""
    n, experts = probs.shape
    real = probs.new_ones(n) if real is None else real.to(probs)
    counts = torch.zeros(experts, device=probs.device).index_add_(
        0, chosen.reshape(-1), real.repeat_interleave(chosen.shape[1]))
    return torch.cat([counts, (probs * real[:, None]).sum(dim=0), real.sum()[None]])


def balancing_over(mine: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss E · Σ_e f_e · P_e from tallies ([..., 2E + 1]: `mine`, this
    process's, and `total`, those summed over every process that shares the micro-batch, or `mine`): f_e the share
    of the token-to-expert assignments that went to expert e, P_e the mean router probability of e. 1 when
    perfectly balanced. The value is that of the whole micro-batch; the gradient reaches this process's tokens
    only, as the whole micro-batch's would (DDP/FSDP then add the processes' gradients). Summed over the leading
    dimensions (layers)."""
    experts = mine.shape[-1] // 2
    counts, tokens = total[..., :experts], total[..., 2 * experts].clamp(min=1)
    probs = mine[..., experts:2 * experts]
    probs = probs + (total[..., experts:2 * experts] - probs).detach()  # the total's value, this process's graph
    share = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)
    return experts * (share * probs / tokens[..., None]).sum()


def balancing_loss(probs: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """The balancing loss of N tokens' router probabilities [N, E] and the experts' assignment counts (N·k in all),
    computed directly: what `balancing_over` gives for one process's tally of the same tokens."""
    n, experts = probs.shape
    share = counts.float() / max(n * top_k, 1)
    return experts * (share * probs.mean(dim=0)).sum()


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def chosen_layers(n_layers: int, layers) -> list[int]:
    """`all`, `every_other` (layers 1, 3, 5, …: MoE alternates with dense FFNs) or a list of layer indices."""
    if layers == "all":
        return list(range(n_layers))
    if layers == "every_other":
        return list(range(1, n_layers, 2))
    if isinstance(layers, (list, tuple)) and layers and all(isinstance(i, int) for i in layers):
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"moe.layers: {bad} outside the LM's {n_layers} layers")
        return sorted(set(layers))
    raise ValueError(f"moe.layers: expected {' or '.join(LAYER_CHOICES)} or a list of layer indices, got {layers!r}")


def add_moe(lm: nn.Module, experts: int, top_k: int, layers="every_other") -> list[int]:
    """Turn the `mlp` of each chosen decoder layer of `lm` into an MoEFeedForward, in place; returns the layers."""
    decoder = lm.get_decoder()
    blocks = getattr(decoder, "layers", None)
    if blocks is None or not all(hasattr(b, "mlp") for b in blocks):
        raise ValueError(f"moe: {type(decoder).__name__} has no `layers` with an `mlp` each to convert")
    hidden = lm.config.get_text_config().hidden_size if hasattr(lm.config, "get_text_config") \
        else lm.config.hidden_size
    ids = chosen_layers(len(blocks), layers)
    for i in ids:
        if not isinstance(blocks[i].mlp, MoEFeedForward):
            blocks[i].mlp = MoEFeedForward(blocks[i].mlp, hidden, experts, top_k)
    return ids


def has_moe(model: nn.Module) -> bool:
    return bool(moe_layers(model))


def is_moe_param(name: str) -> bool:
    """What `lm: moe` trains: the MoE layers' experts and routers (not other routers, e.g. LaVIN's adapters')."""
    return re.search(r"\.mlp\.(experts\.\d+|router)\.", name) is not None


def mark(lm: nn.Module, real: torch.Tensor | None) -> None:
    """Tell the MoE layers of `lm` which positions of the next forward hold tokens ([B, T], nonzero) and which
    padding: the balancing loss counts tokens only, so it does not depend on how a batch is padded (or split
    over processes). The composite model does it before each forward; without it, every position counts."""
    flat = None if real is None else real.reshape(-1)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
    for block in getattr(decoder, "layers", ()):
        if isinstance(getattr(block, "mlp", None), MoEFeedForward):
            block.mlp.real = flat


def tallies(model: nn.Module) -> torch.Tensor | None:
    """The MoE layers' tallies of their last forward, [layers, 2E + 1] (None without MoE layers)."""
    found = [m.tally for m in moe_layers(model) if m.tally is not None]
    return torch.stack(found) if found else None


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the MoE layers' balancing losses over their last forward's tokens (None without MoE layers)."""
    mine = tallies(model)
    return None if mine is None else balancing_over(mine, mine.detach())
