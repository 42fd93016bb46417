"""LaVIN's mixture-of-modality adaptation (MMA): light adapters in the LM, mixed by the input's modality.

In every decoder layer the normalised input of attention (and, optionally, of the FFN) gets LaVIN's RepAdapter
router: one shared down-projection (d → dim, no activation, dropout 0.1) and two grouped up-projections
(dim → d in `groups` blocks, LaVIN's Conv1d with groups=2; they start at zero, so the adapted LM starts equal to
the plain one) mixed by a router. Without an activation the adapter is linear in its input: for a fixed modality
it folds into one d × d matrix and a bias (`folded`). The router reads a learned modality token: one embedding for
text-only samples, one for samples with an image, so the two kinds of input take different mixtures of the paths.
Which samples hold an image is told by the composite model before each forward (`mark`), per row or, for packed
rows, per sample.

With `mma.vision`, each ViT block of the vision tower gets an adapter before its attention (LaVIN's
`set_Clip_Adapter`): by default LaVIN's two-path router (`router`, `VisionRouterAdapter`), whose mixture each image
takes from its class token; or the single-path RepAdapter (`normal`, `VisionAdapter`). Both start at zero.

The adapters and modality tokens are created on the CPU (`meta.new_on`): under FSDP, where the LM is on the meta
device, they are sharded from the values one process would give them, and the wrapped normalisation keeps its
shards (`former_name`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.core import RecipeError
from mmbridge.models.meta import new_on
from mmbridge.registry import SETTINGS

PLACES = {"attention": "input_layernorm", "ffn": "post_attention_layernorm"}
VISION_NORMS = ("layer_norm1", "norm1", "layernorm_before")  # CLIP / SigLIP, DINOv2, ViT: the pre-attention norm


class Modality(nn.Module):
    """The LM's modality tokens (0: text only, 1: with an image) and the current forward's modality per token."""

    def __init__(self, hidden: int, settings: dict | None = None):
        super().__init__()
        self.settings = dict(settings or {})  # add_mma's arguments: what a run's meta saves to rebuild the adapters
        self.tokens = nn.Embedding(2, hidden)
        nn.init.normal_(self.tokens.weight, std=1.0)
        self.current: torch.Tensor | None = None  # [B, T] or [B, 1] of 0/1

    def embedding(self, like: torch.Tensor) -> torch.Tensor:
        if self.current is None:
            raise RuntimeError("MMA adapters: the forward's modality was not marked (MultimodalLM does it)")
        return self.tokens(self.current.to(like.device)).to(like.dtype)


class GroupedUp(nn.Module):
    """dim → hidden in `groups` independent blocks (a 1×1 Conv1d with groups, as LaVIN's conv_B / conv_D): block g
    maps inputs [g·dim/G, (g+1)·dim/G) to outputs [g·d/G, (g+1)·d/G). Starts at zero."""

    def __init__(self, dim: int, hidden: int, groups: int, dtype=None):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(hidden, dim // groups, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden, dtype=dtype))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        g = self.groups
        parts = a.unflatten(-1, (g, -1))  # [..., G, dim/G]
        w = self.weight.unflatten(0, (g, -1))  # [G, d/G, dim/G]
        return torch.einsum("...gi,goi->...go", parts, w).flatten(-2) + self.bias


class ModalityAdapter(nn.Module):
    """A normalisation followed by LaVIN's RepAdapter router: with a = dropout(down(h)),
    `h + s·(w_0 · up_0(a) + w_1 · up_1(a))`, w = softmax(router(modality) / τ)."""

    def __init__(
        self,
        norm: nn.Module,
        hidden: int,
        dim: int,
        temperature: float,
        modality: Modality,
        groups: int = 2,
        dropout: float = 0.1,
        scale: float = 1.0,
    ):
        super().__init__()
        if dim % groups or hidden % groups:
            raise ValueError(f"mma: dim {dim} and the LM width {hidden} must be divisible by groups {groups}")
        self.norm, self.temperature, self.scale = norm, temperature, scale
        weight = next(norm.parameters())
        kw = {"dtype": weight.dtype}  # drawn on the CPU, then moved to the norm's device (`new_on`)
        down = nn.Linear(hidden, dim, **kw)
        nn.init.xavier_uniform_(down.weight)
        nn.init.zeros_(down.bias)
        self.down = new_on(down, weight)
        self.dropout = nn.Dropout(dropout)
        self.up = new_on(nn.ModuleList(GroupedUp(dim, hidden, groups, **kw) for _ in range(2)), weight)
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
        a = self.dropout(self.down(h))
        return h + self.scale * (w[..., :1] * self.up[0](a) + w[..., 1:] * self.up[1](a))

    @torch.no_grad()
    def folded(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For router weights `w` [2], the adapter (in eval) as one map h ↦ h @ M.T + c: returns (M, c)."""
        eye = torch.eye(self.down.in_features, dtype=self.down.weight.dtype, device=self.down.weight.device)
        a = self.down(eye) - self.down.bias  # the down-projection's columns, [d, dim]
        mix = sum(wi * (up(a) - up.bias) for wi, up in zip(w, self.up))  # [d, d]: row i is the image of e_i
        bias = sum(wi * up(self.down.bias) for wi, up in zip(w, self.up))
        return eye + self.scale * mix.T, self.scale * bias


def add_mma(
    lm: nn.Module, dim: int = 8, temperature: float = 10.0, where=("attention",), groups: int = 2, dropout: float = 0.1
) -> int:
    """Put a ModalityAdapter after the chosen norms of every decoder layer of `lm`, in place; returns the count."""
    bad = [w for w in where if w not in PLACES]
    if bad or not where:
        raise ValueError(f"mma.where: expected a non-empty list of {sorted(PLACES)}, got {list(where)!r}")
    hidden = lm.get_input_embeddings().embedding_dim
    decoder = lm.get_decoder()
    settings = {"dim": dim, "temperature": temperature, "where": list(where), "groups": groups, "dropout": dropout}
    modality = new_on(Modality(hidden, settings), lm.get_input_embeddings().weight)
    lm.mma_modality = modality
    count = 0
    for layer in decoder.layers:
        for place in where:
            norm = getattr(layer, PLACES[place], None)
            if norm is None:
                raise ValueError(f"mma: {type(layer).__name__} has no {PLACES[place]} to adapt")
            setattr(layer, PLACES[place], ModalityAdapter(norm, hidden, dim, temperature, modality, groups, dropout))
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
    return "mma_modality." in name or any(
        f"{norm}.{k}." in name for norm in (*PLACES.values(), *VISION_NORMS) for k in ("down", "up", "router")
    )


VISION_KINDS = ("router", "normal")  # LaVIN's visual_adapter_type: its scripts train `router`


class VisionAdapter(nn.Module):
    """A ViT block's pre-attention normalisation followed by LaVIN's RepAdapter (`visual_adapter_type: normal`):
    one path, no router, `h + s·up(dropout(down(h)))`; the grouped up-projection starts at zero."""

    def __init__(
        self, norm: nn.Module, hidden: int, dim: int, groups: int = 2, dropout: float = 0.1, scale: float = 1.0
    ):
        super().__init__()
        if dim % groups or hidden % groups:
            raise ValueError(f"mma.vision: dim {dim} and the encoder width {hidden} must be divisible by {groups}")
        self.norm, self.scale = norm, scale
        weight = next(norm.parameters())
        down = nn.Linear(hidden, dim, dtype=weight.dtype)
        nn.init.xavier_uniform_(down.weight)
        nn.init.zeros_(down.bias)
        self.down = new_on(down, weight)
        self.dropout = nn.Dropout(dropout)
        self.up = new_on(self._ups(dim, hidden, groups, weight.dtype), weight)

    former_name = staticmethod(ModalityAdapter.former_name)

    @staticmethod
    def _ups(dim: int, hidden: int, groups: int, dtype) -> nn.Module:
        return GroupedUp(dim, hidden, groups, dtype=dtype)

    def trainable(self) -> list[nn.Parameter]:
        """What trains in an mma stage: the adapter, not the tower's normalisation it wraps."""
        return [p for n, p in self.named_parameters() if not n.startswith("norm.")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return h + self.scale * self.up(self.dropout(self.down(h)))


class VisionRouterAdapter(VisionAdapter):
    """LaVIN's RepAdapter router in a ViT block (`visual_adapter_type: router`): with a = dropout(down(h)),
    `h + s·(w_0 · up_0(a) + w_1 · up_1(a))`, w = softmax(router(h_cls) / τ) per image, where h_cls is the image's
    normalised input at its class token (`read: cls`, position 0), or, in a tower without one (SigLIP), the mean
    of its tokens (`read: mean`). Shared down-projection, two grouped up-projections at zero, no activation."""

    def __init__(
        self,
        norm: nn.Module,
        hidden: int,
        dim: int,
        temperature: float = 10.0,
        groups: int = 2,
        dropout: float = 0.1,
        scale: float = 1.0,
        read: str = "cls",
    ):
        if read not in ("cls", "mean"):
            raise ValueError(f"mma.vision: the router reads 'cls' or 'mean', got {read!r}")
        super().__init__(norm, hidden, dim, groups, dropout, scale)
        self.temperature, self.read = temperature, read
        weight = next(norm.parameters())
        self.router = new_on(nn.Linear(hidden, 2, dtype=weight.dtype), weight)

    @staticmethod
    def _ups(dim: int, hidden: int, groups: int, dtype) -> nn.Module:
        return nn.ModuleList(GroupedUp(dim, hidden, groups, dtype=dtype) for _ in range(2))

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        """Each image's router weights [B, 2] from its normalised tokens h [B, L, d]."""
        if h.dim() != 3:
            raise ValueError(f"mma.vision router: expected tokens [images, length, width], got {tuple(h.shape)}")
        summary = h[:, 0] if self.read == "cls" else h.mean(dim=1)
        return F.softmax(self.router(summary) / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        w = self.weights(h)[:, None, :]  # [B, 1, 2]: one mixture for all of an image's tokens
        a = self.dropout(self.down(h))
        return h + self.scale * (w[..., :1] * self.up[0](a) + w[..., 1:] * self.up[1](a))


def has_class_token(vision: nn.Module) -> bool:
    """The tower puts a class token first (CLIP's `class_embedding`, ViT / DINOv2's `cls_token`); SigLIP does not."""
    return any(hasattr(m, "class_embedding") or hasattr(m, "cls_token") for m in vision.modules())


def add_vision_mma(
    vision: nn.Module,
    dim: int = 8,
    groups: int = 2,
    dropout: float = 0.1,
    kind: str = "router",
    temperature: float = 10.0,
) -> int:
    """Wrap the pre-attention norm of every block of an HF ViT tower with a vision adapter of `kind` (`router`:
    VisionRouterAdapter, `normal`: VisionAdapter), in place; the count."""
    if kind not in VISION_KINDS:
        raise ValueError(f"mma.vision: expected one of {list(VISION_KINDS)}, got {kind!r}")
    read = "cls" if has_class_token(vision) else "mean"
    count = 0
    for module in list(vision.modules()):
        name = next((n for n in VISION_NORMS if isinstance(getattr(module, n, None), nn.LayerNorm)), None)
        if name is None:
            continue
        norm = getattr(module, name)
        width = norm.normalized_shape[0]
        if kind == "router":
            adapter = VisionRouterAdapter(norm, width, dim, temperature, groups, dropout, read=read)
        else:
            adapter = VisionAdapter(norm, width, dim, groups, dropout)
        setattr(module, name, adapter.train(norm.training))  # in the tower's mode: a frozen tower's start w/o dropout
        count += 1
    if not count:
        raise ValueError(f"mma.vision: found no ViT blocks ({'/'.join(VISION_NORMS)}) in {type(vision).__name__}")
    return count


def vision_kind(setting, saved: bool = False) -> str | None:
    """`mma.vision` → the adapter kind, or None when off. In a recipe `true` is LaVIN's scripts' `router`; in a
    run's meta (`saved`) the kind is written out, and a bare `true` comes from a run saved before the router
    existed, when it meant the single path (`normal`)."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return "normal" if saved else "router"
    if setting in VISION_KINDS:
        return setting
    raise ValueError(f"expected true, false or one of {list(VISION_KINDS)}, got {setting!r}")


def has_vision_mma(vision: nn.Module) -> bool:
    return any(isinstance(m, VisionAdapter) for m in vision.modules())


def mma_settings(lm: nn.Module, vision: nn.Module | None = None) -> dict | None:
    """What `add_mma` (and `add_vision_mma`) built, read back from the modules: a run's meta saves it and
    `load_run` rebuilds the same adapters (None without them)."""
    if not has_mma(lm):
        return None
    adapters = [m for m in vision.modules() if isinstance(m, VisionAdapter)] if vision is not None else []
    kind = None if not adapters else "router" if isinstance(adapters[0], VisionRouterAdapter) else "normal"
    return {**lm.mma_modality.settings, **({"vision": kind} if kind else {})}


@SETTINGS.register("mma")
def check_mma_settings(mma, where: str) -> None:
    """A stage's `mma` section (config.MmaConfig): adapter width, groups, dropout, places, vision adapters."""
    if mma.dim < 1 or mma.temperature <= 0:
        raise RecipeError(f"{where}: need dim >= 1 and temperature > 0, got {mma.dim} and {mma.temperature}")
    if mma.groups < 1 or mma.dim % mma.groups or not 0 <= mma.dropout < 1:
        raise RecipeError(
            f"{where}: need groups dividing dim and 0 <= dropout < 1, got groups {mma.groups}, "
            f"dim {mma.dim}, dropout {mma.dropout}"
        )
    if not mma.where or any(w not in PLACES for w in mma.where):
        raise RecipeError(f"{where}.where: expected a non-empty list of {sorted(PLACES)}, got {mma.where!r}")
    try:
        vision_kind(mma.vision)
    except ValueError as e:
        raise RecipeError(f"{where}.vision: {e}") from e
