"""How an image becomes encoder views and visual tokens: one square resize, or LLaVA-NeXT's AnyRes tiles.

`Tiling` (the recipe's `model.tiling`) is what the processor asks per image: the S×S views the encoder reads
(`views`) and where each of the image's LM tokens comes from (`token_index`): a row of the bridge's outputs for
those views, flattened view by view, or -1 for the learned `image_newline`. The number of tokens of an image is
the length of that index, so it depends on the image's size (its layout), not on one fixed count.

- `mode: none` (default): one view, the image resized to S×S; its tokens are the bridge's outputs in order.
- `mode: anyres` (LLaVA-NeXT): the grid chosen from the image size among `grids` (rows×cols of S×S tiles) or
  `pinpoints` (LLaVA-NeXT's (width, height) in tiles, or a range "(1x1),...,(6x6)"); by default LLaVA-NeXT's
  pinpoints in its order (2×1, 1×2, 2×2, 1×3, 3×1 as rows×cols; `data/tiling.py`). The global view's tokens
  come first (`global_view`), then the tiles' token maps placed as one map with the padding's rows or columns
  removed (LLaVA-NeXT's `unpad_image`) and a newline after each row (`newline`). `anyres_max: N`
  (LLaVA-OneVision's anyres_max_N) shrinks a map of more than about N views' tokens bilinearly: each token is
  then a weighted sum of four bridge outputs (`visual_index` [tokens, 8]: four rows, four weights). The bridge
  must give a square g×g map per view, with g dividing S.
- `mode: uhd` (LLaVA-UHD): slices as UHD's `cal_num_of_slices` cuts them (the ideal count capped at `max_slices`,
  default UHD's 6; `data/tiling.py`) and an overview, each resized to keep its aspect with an area near S² and
  whole patches (`patch`), encoded at that size and compressed by the bridge (a resampler; Qwen-VL's
  position-aware `kind: qwen` unless another kind is named) to the same count, whatever the resolution. An
  image's span is the overview's tokens, then the slices row by row with the LM's own "," between the slices of a
  row and "\n" after each row (`separators`).
- `mode: monkey` (Monkey): the image resized to `windows` (rows×cols) S×S windows, each encoded by the shared
  encoder with its own window's LoRA (`models/window_lora.py`; `rank`, `alpha`, `targets`, `mlp_rank`, `dropout`;
  Monkey's by default: fused q/k/v and out_proj at rank 16, the MLP at 32, learned scales, dropout 0.05), then
  the global view (no adapter); the bridge's tokens of each view in that order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from mmbridge.data.anyres import assemble, max_grid
from mmbridge.data.tiling import (
    ANYRES_GRIDS,
    anyres_layout,
    cut_tiles,
    pinpoint_grids,
    slice_size,
    uhd_grid,
    uhd_slices,
)

MODES = ("none", "anyres", "uhd", "monkey")


class Tiling:
    """A per-image layout policy; `base` (S) and `per_view` (the bridge's tokens per view) are read from the
    processor when used, so a stage that changes the resolution changes them too."""

    def __init__(
        self,
        mode: str = "none",
        grids=None,
        pinpoints=None,
        anyres_max: int | None = None,
        newline: bool = True,
        global_view: bool = True,
        max_slices: int = 6,
        separators: bool = True,
        patch: int = 1,
        windows=(2, 2),
        rank: int = 16,
        alpha: float | None = None,
        targets=(("q_proj", "k_proj", "v_proj"), "out_proj"),
        mlp_rank: int = 32,
        dropout: float = 0.05,
    ):
        if mode not in MODES:
            raise ValueError(f"model.tiling.mode: {mode!r}; expected one of {list(MODES)}")
        if int(max_slices) < 1:
            raise ValueError(f"model.tiling.max_slices: expected at least 1, got {max_slices}")
        self.mode, self.newline, self.global_view = mode, bool(newline) and mode == "anyres", bool(global_view)
        self.max_slices, self.separators = int(max_slices), bool(separators)
        self.patch = int(patch)  # the encoder's patch size (UHD sizes its views in whole patches); set by the build
        try:
            self.windows = (int(windows[0]), int(windows[1]))
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"model.tiling.windows: expected [rows, cols], got {windows!r}") from None
        if min(self.windows) < 1 or int(rank) < 1 or int(mlp_rank) < 0 or not 0 <= float(dropout) < 1:
            raise ValueError(
                f"model.tiling: windows {windows!r} and rank {rank!r} must be positive, mlp_rank "
                f"{mlp_rank!r} at least 0 and dropout {dropout!r} in [0, 1)"
            )
        self.rank, self.alpha = int(rank), None if alpha is None else float(alpha)
        self.targets = tuple(t if isinstance(t, str) else tuple(t) for t in targets)
        self.mlp_rank, self.dropout = int(mlp_rank), float(dropout)
        if anyres_max is not None and int(anyres_max) < 1:
            raise ValueError(f"model.tiling.anyres_max: expected at least 1 view's tokens, got {anyres_max}")
        self.anyres_max = None if anyres_max is None else int(anyres_max)
        if grids is not None and pinpoints is not None:
            raise ValueError("model.tiling: give grids ([rows, cols]) or pinpoints ([width, height]), not both")
        grids = pinpoint_grids(pinpoints) if pinpoints is not None else ANYRES_GRIDS if grids is None else grids
        try:
            self.grids = tuple((int(r), int(c)) for r, c in grids)
        except (TypeError, ValueError):
            raise ValueError(f"model.tiling.grids: expected a list of [rows, cols] pairs, got {grids!r}") from None
        if not self.grids or any(r < 1 or c < 1 for r, c in self.grids):
            raise ValueError(f"model.tiling.grids: expected positive [rows, cols] pairs, got {grids!r}")

    @classmethod
    def from_options(cls, options: dict | None) -> Tiling:
        options = dict(options or {})
        known = {
            "mode",
            "grids",
            "pinpoints",
            "anyres_max",
            "newline",
            "global_view",
            "max_slices",
            "separators",
            "windows",
            "rank",
            "alpha",
            "targets",
            "mlp_rank",
            "dropout",
        }
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"model.tiling.{sorted(unknown)[0]}: unknown key; expected one of {sorted(known)}")
        return cls(**options)

    @property
    def varies(self) -> bool:
        """Whether an image's token count depends on its size."""
        return self.mode != "none"

    @property
    def key(self) -> str:
        """What a data index's fingerprint takes from the tiling."""
        if not self.varies:
            return "none"
        if self.mode == "uhd":
            return f"uhd2-{self.max_slices}-{int(self.separators)}-{self.patch}"
        if self.mode == "monkey":
            return f"monkey-{self.windows}"
        # "next": the global view first and LLaVA-NeXT's unpadding (older indexes counted otherwise)
        return f"{self.mode}-next-{self.grids}-{int(self.newline)}-{int(self.global_view)}-{self.anyres_max}"

    @property
    def by_size(self) -> bool:
        """Whether an image's views and count follow its size (AnyRes, UHD; Monkey's are the same for all)."""
        return self.mode in ("anyres", "uhd")

    @property
    def own_sizes(self) -> bool:
        """Whether views are encoded at their own sizes (UHD) rather than all at S×S."""
        return self.mode == "uhd"

    def check(self, base: int, per_view: int) -> int:
        """The side g of the bridge's g×g token map per view; raises if AnyRes cannot place it."""
        side = math.isqrt(per_view)
        if self.mode == "anyres" and (side * side != per_view or base % side):
            raise ValueError(
                f"model.tiling.mode={self.mode}: the bridge gives {per_view} tokens per view; expected "
                f"a square g×g map with g dividing the image size {base}"
            )
        return side

    def views(self, image: Image.Image, base: int) -> list[Image.Image]:
        """The encoder's views of `image`, in the order the bridge's outputs are indexed."""
        if not self.varies:
            return [image]
        if self.mode == "monkey":  # windows over the whole image resized to the grid, then the global view
            rows, cols = self.windows
            image = image.convert("RGB")
            big = image.resize((cols * base, rows * base), Image.Resampling.BICUBIC)
            return [
                big.crop((c * base, r * base, (c + 1) * base, (r + 1) * base)) for r in range(rows) for c in range(cols)
            ] + [image.resize((base, base), Image.Resampling.BICUBIC)]
        if self.mode == "uhd":
            image = image.convert("RGB")
            _, slices = uhd_slices(image, base, self.max_slices)
            views = [image] + slices if len(slices) > 1 else [image]
            return [v.resize(slice_size(v.size, base, self.patch), Image.Resampling.BICUBIC) for v in views]
        layout = anyres_layout(image.size, base, self.grids)
        return [image.convert("RGB").resize((base, base), Image.Resampling.BICUBIC)] * self.global_view + cut_tiles(
            image, layout
        )

    def num_views(self, size: tuple[int, int], base: int) -> int:
        if not self.varies:
            return 1
        if self.mode == "monkey":
            return self.windows[0] * self.windows[1] + 1
        if self.mode == "uhd":
            rows, cols = uhd_grid(size, base, self.max_slices)
            return 1 + rows * cols * (rows * cols > 1)
        layout = anyres_layout(size, base, self.grids)
        return layout.rows * layout.cols + int(self.global_view)

    def token_index(self, size: tuple[int, int], base: int, per_view: int) -> np.ndarray:
        """For each of the image's LM tokens, its row in the image's flattened bridge outputs (-1: newline)."""
        if self.mode != "anyres":  # each view's tokens in order (UHD's separators are text, not visual tokens)
            return np.arange(self.num_views(size, base) * per_view, dtype=np.int64)
        side = self.check(base, per_view)
        layout = anyres_layout(size, base, self.grids)
        n, first = layout.rows * layout.cols, per_view * self.global_view  # the global view is view 0
        tiles = torch.arange(first, first + n * per_view).reshape(n, side, side, 1)
        glob = torch.arange(per_view).reshape(-1, 1) if self.global_view else None
        newline = torch.tensor([-1]) if self.newline else None
        if self.anyres_max is None:
            return assemble(tiles, layout, newline, glob).reshape(-1).numpy().astype(np.int64)
        rows, cols = layout.content_cells(layout.base // side)
        kept = assemble(tiles, layout).reshape(rows.stop - rows.start, cols.stop - cols.start).numpy()
        return shrunk_index(
            kept,
            max_grid(*kept.shape, self.anyres_max, side),
            self.newline,
            np.arange(per_view) if self.global_view else None,
        )

    def span(
        self, size: tuple[int, int], base: int, per_view: int, image_id: int, comma: list[int], newline: list[int]
    ) -> np.ndarray:
        """UHD: the LM ids of an image's span: the overview's `per_view` image ids, then each row of slices, the
        `comma` ids between the slices of a row and the `newline` ids after each row (with `separators`)."""
        rows, cols = uhd_grid(size, base, self.max_slices)
        view = [image_id] * per_view
        out = list(view)
        if rows * cols > 1:
            sep = self.separators
            for _ in range(rows):
                out += [t for c in range(cols) for t in view + (comma if sep and c < cols - 1 else [])]
                out += newline if sep else []
        return np.asarray(out, dtype=np.int64)

    def max_count(self, base: int, per_view: int) -> int:
        """The most visual tokens an image can take (AnyRes: its grid's map with no padding removed)."""
        if not self.varies:
            return per_view
        if self.mode == "uhd":
            return per_view * (1 + self.max_slices + 1)
        if self.mode == "monkey":
            return per_view * (self.windows[0] * self.windows[1] + 1)
        side = self.check(base, per_view)
        return max(r * side * (c * side + int(self.newline)) for r, c in self.grids) + per_view * self.global_view

    def count(self, size: tuple[int, int], base: int, per_view: int) -> int:
        """How many visual tokens (image-token positions) an image of `size` becomes; with UHD's separators its
        span is longer (`span`)."""
        return per_view if not self.varies else len(self.token_index(size, base, per_view))


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D bilinear resampling as torch's `interpolate(mode="bilinear", align_corners=False)` with a size: for
    each output, its two source positions and their weights (float32 arithmetic, half-pixel centres)."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    lo = src.astype(np.int64)
    frac = (src - lo).astype(np.float32)
    return np.stack([lo, lo + (lo < n_in - 1)], 1), np.stack([1 - frac, frac], 1)


def shrunk_index(kept: np.ndarray, size: tuple[int, int], newline: bool, glob: np.ndarray | None) -> np.ndarray:
    """anyres_max: the [tokens, 8] index of a map `kept` (its bridge rows) resized to `size` bilinearly: per token
    four source rows then their four weights (float64), the global view first, -1 rows for the newlines."""
    (ri, rw), (ci, cw) = bilinear_taps(kept.shape[0], size[0]), bilinear_taps(kept.shape[1], size[1])
    rows = kept[ri[:, :, None, None], ci[None, None, :, :]]  # [out_r, 2, out_c, 2]
    weights = rw[:, :, None, None] * cw[None, None, :, :]
    mixed = np.concatenate(
        [
            rows.transpose(0, 2, 1, 3).reshape(size[0], size[1], 4),
            weights.transpose(0, 2, 1, 3).reshape(size[0], size[1], 4),
        ],
        axis=-1,
    )
    one = np.array([1.0, 0.0, 0.0, 0.0])
    if newline:
        line = np.broadcast_to(np.r_[[-1.0] * 4, one], (size[0], 1, 8))
        mixed = np.concatenate([mixed, line], axis=1)
    out = mixed.reshape(-1, 8)
    if glob is not None:
        out = np.concatenate([np.c_[np.repeat(glob[:, None], 4, 1), np.tile(one, (len(glob), 1))], out])
    return out.astype(np.float64)


def batch_index(indexes: list[np.ndarray], views: list[int], per_view: int) -> torch.Tensor:
    """One batch's `visual_index`: each image's (or sample's) token index shifted past the views before it (-1
    stays -1: the newline row the model appends after all views' outputs); anyres_max's [tokens, 8] index shifts
    its four rows and keeps its weights."""
    if not indexes:
        return torch.zeros(0, dtype=torch.long)
    offsets = np.concatenate([[0], np.cumsum(views)[:-1]]) * per_view
    flat = np.concatenate([shifted(ix, off) for ix, off in zip(indexes, offsets)])
    return torch.from_numpy(flat.astype(np.int64 if flat.ndim == 1 else np.float64))


def shifted(index: np.ndarray, offset: int) -> np.ndarray:
    if index.ndim == 1:
        return np.where(index < 0, -1, index + offset)
    rows = index[:, :4]
    return np.concatenate([np.where(rows < 0, -1, rows + offset), index[:, 4:]], axis=1)


def require_fixed(processor, what: str) -> None:
    """Refuse, naming `what`, a processor whose images take their own token counts where one count is assumed."""
    tiling = getattr(processor, "tiling", None)
    if tiling is not None and tiling.varies:
        raise ValueError(
            f"{what} assumes one token count per image; model.tiling.mode={tiling.mode} gives each "
            "image its own (use model.tiling.mode: none here)"
        )


def window_ids(n_views: int, windows: tuple[int, int], device=None) -> torch.Tensor:
    """Monkey: each view's window (-1 for the global view), for a batch of whole images' views in order."""
    per = windows[0] * windows[1] + 1
    if n_views % per:
        raise ValueError(f"monkey: {n_views} views are not whole images of {per} views each")
    ids = torch.arange(n_views, device=device) % per
    return torch.where(ids == per - 1, torch.full_like(ids, -1), ids)
