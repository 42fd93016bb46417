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
import math
import re

import torch
from torch import nn

from mmbridge.core import RecipeError
from mmbridge.models.meta import new_on
from mmbridge.registry import SETTINGS

LAYER_CHOICES = ("all", "every_other")


SECOND = ("top", "gumbel")
GATE_KEYS = ("second", "balance", "capacity_factor", "eval_capacity_factor", "min_capacity")
BALANCE = ("all", "top1")


def check_gate(
    top_k: int,
    second: str = "top",
    balance: str = "all",
    capacity_factor: float | None = None,
    eval_capacity_factor: float | None = None,
    min_capacity: int = 0,
) -> None:
    """Raise ValueError for gate options that do not fit together (see MoEFeedForward)."""
    if second not in SECOND:
        raise ValueError(f"moe.second: expected one of {SECOND}, got {second!r}")
    if second == "gumbel" and top_k != 2:
        raise ValueError(f"moe.second: gumbel samples the second of top_k 2 experts, got top_k {top_k}")
    if balance not in BALANCE:
        raise ValueError(f"moe.balance: expected one of {BALANCE}, got {balance!r}")
    for key, cf in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or cf <= 0):
            raise ValueError(f"moe.{key}: expected a positive number or null, got {cf!r}")
    if eval_capacity_factor is not None and capacity_factor is None:
        raise ValueError("moe.eval_capacity_factor: set capacity_factor too (null: no capacity limit)")
    if type(min_capacity) is not int or min_capacity < 0:
        raise ValueError(f"moe.min_capacity: expected an integer >= 0, got {min_capacity!r}")


class MoEFeedForward(nn.Module):
    """Top-k routed experts in place of one FFN; `tally` holds what the last forward adds to the balancing loss.

    Gate options (MoE-LLaVA's pinned DeepSpeed top-2 gate; the defaults are the paper's plain top-k):
    `second: gumbel` takes the second expert as the argmax of the logits plus Gumbel noise, the first excluded
    (while training; the plain second best in eval). `balance: top1` counts only each token's first choice in
    the balancing loss (E·Σ mean(gates)·mean(mask1)); `all` counts every choice. `capacity_factor` (None: no
    limit) caps each expert at ceil(tokens/E · factor · k) assignments (at least `min_capacity`), first choices
    queued before second ones, each in token order; an assignment past the cap is dropped and the token's kept
    weights renormalised (a token with none kept adds nothing: the decoder's residual carries it).
    `eval_capacity_factor` applies in eval mode (None: the training one)."""

    def __init__(
        self,
        ffn: nn.Module,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        second: str = "top",
        balance: str = "all",
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 0,
    ):
        super().__init__()
        if num_experts < 2 or not 1 <= top_k <= num_experts:
            raise ValueError(f"moe: need experts >= 2 and 1 <= top_k <= experts, got {num_experts} and {top_k}")
        check_gate(top_k, second, balance, capacity_factor, eval_capacity_factor, min_capacity)
        self.num_experts, self.top_k = num_experts, top_k
        self.second, self.balance, self.min_capacity = second, balance, min_capacity
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
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
        logits = self.router(h).float()
        probs = logits.softmax(dim=-1)
        if self.second == "gumbel" and self.training:
            first = probs.argmax(dim=-1, keepdim=True)
            noisy = logits + torch.distributions.Gumbel(0.0, 1.0).sample(logits.shape).to(logits.device)
            chosen = torch.cat([first, noisy.scatter(1, first, float("-inf")).argmax(dim=-1, keepdim=True)], 1)
            weights = probs.gather(1, chosen)
        else:
            weights, chosen = probs.topk(self.top_k, dim=-1)
        return probs, chosen, weights / weights.sum(dim=-1, keepdim=True)

    def capacity(self, tokens: int) -> int | None:
        """The most assignments one expert takes from `tokens` tokens (None: no limit)."""
        factor = self.capacity_factor
        if not self.training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        if factor is None:
            return None
        return max(math.ceil(tokens / self.num_experts * factor * self.top_k), self.min_capacity)

    def kept(self, chosen: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor | None:
        """[N, k] True where an assignment fits its expert's capacity (None: no limit). Queue order: every
        token's first choice in token order, then every second choice, …; padding takes no place."""
        cap = self.capacity(chosen.shape[0] if real is None else int(real.sum()))
        if cap is None:
            return None
        onehot = nn.functional.one_hot(chosen.t(), self.num_experts)  # [k, N, E]
        if real is not None:
            onehot = onehot * real.bool()[None, :, None]
        position = (onehot.flatten(0, 1).cumsum(dim=0) - 1).view_as(onehot)  # place in the expert's queue
        place = (position * onehot).sum(dim=-1).t()  # [N, k]
        return place < cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1])
        probs, chosen, weights = self.route(h)
        real = self.real if self.real is not None and self.real.numel() == h.shape[0] else None
        keep = self.kept(chosen, real)
        flat = chosen.reshape(-1)  # [N*k]: token t's j-th choice at t*k + j
        if keep is not None:  # dropped assignments sort last and go nowhere; the kept weights renormalise
            weights = weights * keep
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).eps)
            flat = flat.masked_fill(~keep.reshape(-1), self.num_experts)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts + 1)
        n_kept = int(counts[: self.num_experts].sum())  # one read-back per layer: the slice sizes
        order = order[:n_kept]
        token = order // self.top_k
        slices = h[token].split(counts[: self.num_experts].tolist())
        # every expert runs, on an empty slice too, so each gets a gradient (zeros) on every rank: DDP needs no
        # unused-parameter search, and FSDP's reduce-scatter, which takes the gradients a rank has, lines up
        # (measured: skipping empty experts silently mixed two experts' gradients across 2 FSDP ranks)
        out = torch.cat([expert(s) for expert, s in zip(self.experts, slices)])
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        y = torch.zeros_like(h).index_add_(0, token, out)
        self.tally = tally(probs, chosen[:, :1] if self.balance == "top1" else chosen, real)
        return y.reshape(x.shape)


def tally(probs: torch.Tensor, chosen: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """What the balancing loss needs from one forward, as sums (so ranks can add theirs): per expert the
    assignments to it and its router probabilities, then the token count ([2E + 1], fp32; the probabilities keep
    their graph), over the tokens `real` marks (all without it). A mask, not a selection: the shapes do not
    depend on it, so a recomputed (gradient-checkpointed) forward saves the same tensors."""
    n, experts = probs.shape
    real = probs.new_ones(n) if real is None else real.to(probs)
    counts = torch.zeros(experts, device=probs.device).index_add_(
        0, chosen.reshape(-1), real.repeat_interleave(chosen.shape[1])
    )
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
    probs = mine[..., experts : 2 * experts]
    probs = probs + (total[..., experts : 2 * experts] - probs).detach()  # the total's value, this process's graph
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
    """`all`, `every_other` (layers 0, 2, 4, …: MoE-LLaVA's `sparse` mode, MoE alternating with dense FFNs) or a
    list of layer indices."""
    if layers == "all":
        return list(range(n_layers))
    if layers == "every_other":
        return list(range(0, n_layers, 2))
    if isinstance(layers, (list, tuple)) and layers and all(isinstance(i, int) for i in layers):
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"moe.layers: {bad} outside the LM's {n_layers} layers")
        return sorted(set(layers))
    raise ValueError(f"moe.layers: expected {' or '.join(LAYER_CHOICES)} or a list of layer indices, got {layers!r}")


def add_moe(lm: nn.Module, experts: int, top_k: int, layers="every_other", **gate) -> list[int]:
    """Turn the `mlp` of each chosen decoder layer of `lm` into an MoEFeedForward (`gate`: its gate options), in
    place; returns the layers."""
    decoder = lm.get_decoder()
    blocks = getattr(decoder, "layers", None)
    if blocks is None or not all(hasattr(b, "mlp") for b in blocks):
        raise ValueError(f"moe: {type(decoder).__name__} has no `layers` with an `mlp` each to convert")
    hidden = lm.config.get_text_config().hidden_size if hasattr(lm.config, "get_text_config") else lm.config.hidden_size
    ids = chosen_layers(len(blocks), layers)
    for i in ids:
        if not isinstance(blocks[i].mlp, MoEFeedForward):
            blocks[i].mlp = MoEFeedForward(blocks[i].mlp, hidden, experts, top_k, **gate)
    return ids


def has_moe(model: nn.Module) -> bool:
    return bool(moe_layers(model))


def moe_settings(lm: nn.Module) -> dict | None:
    """The arguments that rebuild the MoE layers of `lm` with `add_moe`, read back from the layers (each keeps its
    own): a run's meta saves them for `load_run` (None without MoE layers)."""
    blocks = getattr(lm.get_decoder(), "layers", ()) if hasattr(lm, "get_decoder") else ()
    ids = [i for i, b in enumerate(blocks) if isinstance(getattr(b, "mlp", None), MoEFeedForward)]
    if not ids:
        return None
    first = blocks[ids[0]].mlp
    return {
        "experts": first.num_experts,
        "top_k": first.top_k,
        "layers": ids,
        **{k: getattr(first, k) for k in GATE_KEYS},
    }


def is_moe_param(name: str, ffn: bool = False) -> bool:
    """What `lm: moe` trains: the MoE layers' experts and routers (not other routers, e.g. LaVIN's adapters');
    with `ffn`, every decoder layer's FFN too, dense ones included (MoE-LLaVA's released `--train_modules`)."""
    if ffn and re.search(r"\.layers\.\d+\.mlp\.", name):
        return True
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


@SETTINGS.register("moe")
def check_moe_settings(moe, where: str) -> None:
    """A stage's `moe` section (config.MoeConfig): expert counts, balancing weight, layers, gate options."""
    if moe.experts < 2 or not 1 <= moe.top_k <= moe.experts:
        raise RecipeError(f"{where}: need experts >= 2 and 1 <= top_k <= experts, got {moe.experts} and {moe.top_k}")
    if moe.aux_weight < 0:
        raise RecipeError(f"{where}.aux_weight: must be >= 0, got {moe.aux_weight}")
    ok_list = isinstance(moe.layers, list) and moe.layers and all(type(i) is int and i >= 0 for i in moe.layers)
    if moe.layers not in LAYER_CHOICES and not ok_list:
        raise RecipeError(
            f"{where}.layers: expected {' or '.join(LAYER_CHOICES)} or a list of layer indices, got {moe.layers!r}"
        )
    try:
        check_gate(moe.top_k, **{k: getattr(moe, k) for k in GATE_KEYS})
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from e
