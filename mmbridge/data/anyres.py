"""LLaVA-NeXT's AnyRes feature map: the global view's tokens, then the tile features placed as one map with the
padding removed and a newline per row (`llava/model/llava_arch.py`, `spatial_unpad`); LLaVA-OneVision's
`anyres_max_N` shrinks a map of more than about N views' tokens by bilinear interpolation."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from mmbridge.data.tiling import TileLayout


def max_grid(rows: int, cols: int, max_views: int | None, side: int) -> tuple[int, int]:
    """The map's size after LLaVA-OneVision's `anyres_max_N` rule: with t = √(rows·cols / (N·side²)), a map with
    t > 1.1 becomes ⌊rows / t⌋ × ⌊cols / t⌋ (floats as its code computes them); otherwise it stays."""
    if not max_views:
        return rows, cols
    times = math.sqrt(rows * cols / (max_views * side**2))
    return (int(rows // times), int(cols // times)) if times > 1.1 else (rows, cols)


def assemble(
    tiles: torch.Tensor,
    layout: TileLayout,
    newline: torch.Tensor | None = None,
    global_view: torch.Tensor | None = None,
    max_views: int | None = None,
) -> torch.Tensor:
    """[rows·cols, h, w, D] tile features (row-major tiles) → [tokens, D]: the `global_view` tokens ([n, D]) if
    given, then the tiles as one (rows·h) × (cols·w) map with the rows or columns that only saw padding removed
    (`TileLayout.content_cells`), shrunk under `max_views` (`max_grid`), `newline` ([D]) after every row."""
    n, h, w, d = tiles.shape
    if n != layout.rows * layout.cols:
        raise ValueError(f"anyres: {n} tiles for a {layout.rows}x{layout.cols} grid")
    if h != w or layout.base % h:
        raise ValueError(f"anyres: a {h}x{w} feature grid per tile does not divide the tile size {layout.base}")
    grid = (
        tiles.reshape(layout.rows, layout.cols, h, w, d)
        .permute(0, 2, 1, 3, 4)
        .reshape(layout.rows * h, layout.cols * w, d)
    )
    rows, cols = layout.content_cells(layout.base // h)
    grid = grid[rows, cols]
    size = max_grid(grid.shape[0], grid.shape[1], max_views, h)
    if size != tuple(grid.shape[:2]):
        grid = F.interpolate(grid.permute(2, 0, 1)[None], list(size), mode="bilinear")[0].permute(1, 2, 0)
    if newline is not None:
        grid = torch.cat([grid, newline.to(grid.dtype).expand(grid.shape[0], 1, d)], dim=1)
    out = grid.reshape(-1, d)
    return out if global_view is None else torch.cat([global_view.to(out.dtype), out], dim=0)


def token_count(
    layout: TileLayout, cells: int, newline: bool = True, global_tokens: int = 0, max_views: int | None = None
) -> int:
    """How many tokens `assemble` returns for this layout with `cells`×`cells` features per tile."""
    rows, cols = layout.content_cells(layout.base // cells)
    r, c = max_grid(rows.stop - rows.start, cols.stop - cols.start, max_views, cells)
    return r * (c + int(newline)) + global_tokens
