"""LLaVA-NeXT's AnyRes feature map: tile features placed as one map, padding removed, a newline per row."""

from __future__ import annotations

import torch

from mmbridge.data.tiling import TileLayout


def assemble(tiles: torch.Tensor, layout: TileLayout, newline: torch.Tensor | None = None,
             global_view: torch.Tensor | None = None) -> torch.Tensor:
    """[rows·cols, h, w, D] tile features (row-major tiles) → [tokens, D]: the tiles as one (rows·h) × (cols·w) map,
    the rows and columns that only saw padding removed, `newline` ([D]) after every remaining row, then the
    `global_view` tokens ([n, D]) if given."""
    n, h, w, d = tiles.shape
    if n != layout.rows * layout.cols:
        raise ValueError(f"anyres: {n} tiles for a {layout.rows}x{layout.cols} grid")
    if h != w or layout.base % h:
        raise ValueError(f"anyres: a {h}x{w} feature grid per tile does not divide the tile size {layout.base}")
    grid = tiles.reshape(layout.rows, layout.cols, h, w, d).permute(0, 2, 1, 3, 4).reshape(layout.rows * h,
                                                                                              layout.cols * w, d)
    rows, cols = layout.content_cells(layout.base // h)
    grid = grid[rows, cols]
    if newline is not None:
        grid = torch.cat([grid, newline.to(grid.dtype).expand(grid.shape[0], 1, d)], dim=1)
    out = grid.reshape(-1, d)
    return out if global_view is None else torch.cat([out, global_view.to(out.dtype)], dim=0)


def token_count(layout: TileLayout, cells: int, newline: bool = True, global_tokens: int = 0) -> int:
    """How many tokens `assemble` returns for this layout with `cells`×`cells` features per tile."""
    rows, cols = layout.content_cells(layout.base // cells)
    r, c = rows.stop - rows.start, cols.stop - cols.start
    return r * (c + int(newline)) + global_tokens
