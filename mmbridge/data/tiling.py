"""High-resolution layouts: which grid of encoder-sized tiles an image is cut into.

- **AnyRes** (LLaVA-NeXT): from candidate grids of S×S tiles, the one that keeps the most of the image's
  resolution once it is resized (aspect kept) to fit, then the one that wastes the least area; the image is resized,
  padded to the grid and cut into tiles, and a global view (the whole image resized to S×S) is added.
- **UHD** (LLaVA-UHD): the ideal slice count N = ⌈W·H / S²⌉ (capped); among the partitions m × n (columns × rows)
  of N−1, N and N+1 the one whose slices' aspect ratio is closest to the encoder's square, by |log((W/m)/(H/n))|.
  Each slice keeps its own aspect; an overview image is added.

The choice depends only on the image size. Sizes are (width, height) and grids (rows, cols) throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

# LLaVA-NeXT's default grids for a base size S, as (rows, cols): 1×2, 2×1, 2×2, 1×3, 3×1 tiles
ANYRES_GRIDS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))


@dataclass(frozen=True)
class TileLayout:
    """Where an image's tiles come from: the grid, the size the image is resized to inside the padded canvas
    (rows·S × cols·S) and its offset there, so the padding's feature rows and columns can be removed."""

    rows: int
    cols: int
    base: int
    resized: tuple[int, int]  # (width, height) of the image inside the canvas
    offset: tuple[int, int]  # (x, y) of its top-left corner

    @property
    def canvas(self) -> tuple[int, int]:
        return self.cols * self.base, self.rows * self.base

    def content_cells(self, cell: int) -> tuple[slice, slice]:
        """Rows and columns of a feature map of the whole canvas (one cell per `cell` pixels) that the image
        covers, rounded outwards: (row slice, column slice)."""
        (x, y), (w, h) = self.offset, self.resized
        return slice(y // cell, math.ceil((y + h) / cell)), slice(x // cell, math.ceil((x + w) / cell))


def anyres_grid(size: tuple[int, int], base: int, grids=ANYRES_GRIDS) -> tuple[int, int]:
    """The grid (rows, cols) with the largest effective resolution for an image of `size`, then the least waste."""
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


def uhd_grid(size: tuple[int, int], base: int, max_slices: int = 9) -> tuple[int, int]:
    """LLaVA-UHD's partition (rows, cols); (1, 1) when the image needs no slicing."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"uhd: image size must be positive, got {size}")
    ideal = min(math.ceil(width * height / base**2), max_slices)
    if ideal <= 1:
        return 1, 1
    best, best_score = None, None
    for count in (ideal, ideal - 1, ideal + 1):  # ties go to the ideal count
        if not 1 < count <= max_slices:
            continue
        for cols in range(1, count + 1):
            if count % cols:
                continue
            rows = count // cols
            score = -abs(math.log((width / cols) / (height / rows)))
            if best_score is None or score > best_score + 1e-12:
                best, best_score = (rows, cols), score
    return best


def anyres_layout(size: tuple[int, int], base: int, grids=ANYRES_GRIDS) -> TileLayout:
    """The chosen grid, and the image resized (aspect kept) to fit it, centred on the canvas."""
    rows, cols = anyres_grid(size, base, grids)
    width, height = size
    scale = min(cols * base / width, rows * base / height)
    resized = (min(cols * base, max(1, round(width * scale))), min(rows * base, max(1, round(height * scale))))
    offset = ((cols * base - resized[0]) // 2, (rows * base - resized[1]) // 2)
    return TileLayout(rows, cols, base, resized, offset)


def cut_tiles(image: Image.Image, layout: TileLayout, fill=(0, 0, 0)) -> list[Image.Image]:
    """Resize into the layout's canvas, pad with `fill`, cut row-major into S×S tiles."""
    canvas = Image.new("RGB", layout.canvas, fill)
    canvas.paste(image.convert("RGB").resize(layout.resized, Image.Resampling.BICUBIC), layout.offset)
    s = layout.base
    return [canvas.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(layout.rows) for c in range(layout.cols)]


def uhd_slices(image: Image.Image, base: int, max_slices: int = 9) -> tuple[tuple[int, int], list[Image.Image]]:
    """The UHD grid and its slices, row-major, each cut from the original image (own aspect, no padding)."""
    rows, cols = uhd_grid(image.size, base, max_slices)
    width, height = image.size
    xs = [round(c * width / cols) for c in range(cols + 1)]
    ys = [round(r * height / rows) for r in range(rows + 1)]
    return (rows, cols), [image.crop((xs[c], ys[r], xs[c + 1], ys[r + 1])) for r in range(rows) for c in range(cols)]


def slice_size(size: tuple[int, int], base: int, patch: int) -> tuple[int, int]:
    """The size a UHD slice is encoded at: its area near S² with its aspect kept, both sides multiples of the
    encoder's patch size (so the position table is interpolated to a whole grid)."""
    width, height = size
    scale = base / math.sqrt(width * height)
    return (max(patch, round(width * scale / patch) * patch), max(patch, round(height * scale / patch) * patch))
