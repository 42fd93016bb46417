"""High-resolution layouts: which grid of encoder-sized tiles an image is cut into.

- **AnyRes** (LLaVA-NeXT, `llava/mm_utils.py`): among candidate grids of S×S tiles (LLaVA-NeXT's pinpoints, listed
  as (width, height)), the one that keeps the most of the image's resolution once it is resized (aspect kept) to
  fit, then the one that wastes the least area, the first listed on a tie (`select_best_resolution`); the image is
  resized (the shorter scaled side rounded up), centred on the black canvas and cut into tiles; the global view
  (the whole image resized to S×S) comes first. The padding's feature rows or columns are removed symmetrically by
  `unpad_image`'s rule (`TileLayout.content_cells`).
- **UHD** (LLaVA-UHD): the ideal slice count N = ⌈W·H / S²⌉ (capped); among the partitions m × n (columns × rows)
  of N−1, N and N+1 the one whose slices' aspect ratio is closest to the encoder's square, by |log((W/m)/(H/n))|.
  Each slice keeps its own aspect; an overview image is added.

The choice depends only on the image size. Sizes are (width, height); our grids are (rows, cols) and LLaVA-NeXT's
pinpoints (width, height) in tiles.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from PIL import Image

# LLaVA-NeXT's default pinpoints (llava-v1.6: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]) in
# tiles, (width, height), in its order; and the same as our (rows, cols) grids: 2×1, 1×2, 2×2, 1×3, 3×1
ANYRES_PINPOINTS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
ANYRES_GRIDS: tuple[tuple[int, int], ...] = tuple((h, w) for w, h in ANYRES_PINPOINTS)


def pinpoint_grids(pinpoints) -> tuple[tuple[int, int], ...]:
    """LLaVA-NeXT's pinpoints as our (rows, cols) grids, in their order: a list of [width, height] in tiles, or
    LLaVA-OneVision's range "(1x1),...,(6x6)" (width x height; widths outer, heights inner, as its train.py)."""
    if isinstance(pinpoints, str):
        found = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
        if not found:
            raise ValueError(f"model.tiling.pinpoints: {pinpoints!r}; expected a range like '(1x1),...,(6x6)'")
        (w0, h0), (w1, h1) = (tuple(map(int, found[0])), tuple(map(int, found[-1])))
        pinpoints = [(w, h) for w in range(w0, w1 + 1) for h in range(h0, h1 + 1)]
    try:
        grids = tuple((int(h), int(w)) for w, h in pinpoints)
    except (TypeError, ValueError):
        raise ValueError(
            f"model.tiling.pinpoints: expected [width, height] pairs in tiles, got {pinpoints!r}"
        ) from None
    return grids


@dataclass(frozen=True)
class TileLayout:
    """Where an image's tiles come from: the grid, the image's own size, the size it is resized to inside the
    padded canvas (cols·S × rows·S) and its offset there."""

    rows: int
    cols: int
    base: int
    resized: tuple[int, int]  # (width, height) of the image inside the canvas
    offset: tuple[int, int]  # (x, y) of its top-left corner
    image: tuple[int, int] = (0, 0)  # (width, height) of the original image

    @property
    def canvas(self) -> tuple[int, int]:
        return self.cols * self.base, self.rows * self.base

    def content_cells(self, cell: int) -> tuple[slice, slice]:
        """Rows and columns kept of a feature map of the whole canvas (one cell per `cell` pixels): LLaVA-NeXT's
        `unpad_image` with exact integers (transformers' rounding): the image's extent at the map's scale,
        floored, and the rest split evenly, the smaller half on each side (an odd remainder keeps one row more)."""
        (width, height), h, w = self.image, self.rows * self.base // cell, self.cols * self.base // cell
        if width * h > w * height:  # relatively wider than the map: rows were padded
            pad = (h - height * w // width) // 2
            return slice(pad, h - pad), slice(0, w)
        pad = (w - width * h // height) // 2
        return slice(0, h), slice(pad, w - pad)


def anyres_grid(size: tuple[int, int], base: int, grids=ANYRES_GRIDS) -> tuple[int, int]:
    """The grid (rows, cols) with the largest effective resolution for an image of `size`, then the least waste;
    the first in `grids`' order on a tie (LLaVA-NeXT's `select_best_resolution`)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"anyres: image size must be positive, got {size}")
    best, best_key = None, None
    for rows, cols in grids:
        cw, ch = cols * base, rows * base
        scale = min(cw / width, ch / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(cw * ch - effective))
        if best_key is None or key > best_key:
            best, best_key = (rows, cols), key
    return best


def uhd_grid(size: tuple[int, int], base: int, max_slices: int = 6) -> tuple[int, int]:
    """LLaVA-UHD's partition (rows, cols) as its `cal_num_of_slices`: N = ⌈W·H / S²⌉ capped at `max_slices`;
    candidates the factorisations (columns ascending) of N−1, N and N+1, or of N and N+1 when N ≤ 2 (so an image
    with N = 1 may still split in two, and N = 2 always splits); the one whose grid aspect cols/rows is closest to
    the image's in log scale wins, the first in that order on a tie. (1, 1): no slicing. N+1 may exceed the cap."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"uhd: image size must be positive, got {size}")
    ideal = min(math.ceil(width * height / base**2), max_slices)
    counts = (ideal, ideal + 1) if ideal <= 2 else (ideal - 1, ideal, ideal + 1)
    target, best, best_score = math.log(width / height), None, None
    for count in counts:
        for cols in range(1, count + 1):
            if count % cols == 0:
                score = abs(math.log(cols / (count / cols)) - target)  # UHD's float expression, for its ties
                if best_score is None or score < best_score:
                    best, best_score = (count // cols, cols), score
    return best


def anyres_layout(size: tuple[int, int], base: int, grids=ANYRES_GRIDS) -> TileLayout:
    """The chosen grid and the image resized to fit it (LLaVA-NeXT's `resize_and_pad_image`: the side with the
    smaller scale fills the canvas, the other is scaled and rounded up), centred (offsets rounded down)."""
    rows, cols = anyres_grid(size, base, grids)
    (width, height), cw, ch = size, cols * base, rows * base
    scale_w, scale_h = cw / width, ch / height
    if scale_w < scale_h:
        resized = (cw, min(math.ceil(height * scale_w), ch))
    else:
        resized = (min(math.ceil(width * scale_h), cw), ch)
    offset = ((cw - resized[0]) // 2, (ch - resized[1]) // 2)
    return TileLayout(rows, cols, base, resized, offset, (width, height))


def cut_tiles(image: Image.Image, layout: TileLayout, fill=(0, 0, 0)) -> list[Image.Image]:
    """Resize into the layout's canvas, pad with `fill`, cut row-major into S×S tiles."""
    canvas = Image.new("RGB", layout.canvas, fill)
    canvas.paste(image.convert("RGB").resize(layout.resized, Image.Resampling.BICUBIC), layout.offset)
    s = layout.base
    return [
        canvas.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(layout.rows) for c in range(layout.cols)
    ]


def uhd_slices(image: Image.Image, base: int, max_slices: int = 6) -> tuple[tuple[int, int], list[Image.Image]]:
    """The UHD grid and its slices, row-major, each cut from the original image (own aspect, no padding) at
    UHD's boxes (i·W // cols, j·H // rows)."""
    rows, cols = uhd_grid(image.size, base, max_slices)
    width, height = image.size
    xs = [c * width // cols for c in range(cols + 1)]
    ys = [r * height // rows for r in range(rows + 1)]
    return (rows, cols), [image.crop((xs[c], ys[r], xs[c + 1], ys[r + 1])) for r in range(rows) for c in range(cols)]


def slice_size(size: tuple[int, int], base: int, patch: int) -> tuple[int, int]:
    """The size a UHD slice is encoded at (UHD's `adapt_size`): scaled to an area of S² with its aspect kept, each
    side floored to whole patches (at least one), so it never holds more patches than the S×S position table."""
    width, height, most = size[0], size[1], (base // patch) ** 2
    scale = math.sqrt(most * (patch / height) * (patch / width))
    return tuple(max(min(math.floor(scale * side / patch), most), 1) * patch for side in (width, height))
