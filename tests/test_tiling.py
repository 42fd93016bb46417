"""High-resolution layouts: AnyRes and UHD grid choices, tiles, and the AnyRes feature map."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.data.anyres import assemble, token_count
from mmbridge.data.tiling import anyres_grid, anyres_layout, cut_tiles, slice_size, uhd_grid, uhd_slices


def test_anyres_picks_the_grid_that_keeps_the_most_resolution():
    assert anyres_grid((672, 672), 336) == (2, 2)
    assert anyres_grid((1000, 400), 336) == (1, 3)  # wide: three tiles side by side
    assert anyres_grid((400, 1000), 336) == (3, 1)
    # small: every grid keeps it all, 1x2 and 2x1 waste the least alike: the first listed wins, LLaVA-NeXT's
    # [336, 672] (width, height), i.e. two rows of one tile
    assert anyres_grid((300, 200), 336) == (2, 1)
    assert anyres_grid((300, 200), 336, grids=[(1, 2), (2, 1)]) == (1, 2)


def test_anyres_hand_worked_non_square_case():
    # 800 x 500 at S = 336. Candidates (canvas w x h → scale, effective, waste):
    #   1x2 (672x336): 0.42, 336*210=70560;  2x1 (336x672): 0.42, 70560;  2x2 (672x672): 0.84, 672*420=282240
    #   1x3 (1008x336): 0.672, 537*336=180432;  3x1 (336x1008): 0.42, 70560  → 2x2 keeps the most
    assert anyres_grid((800, 500), 336) == (2, 2)
    layout = anyres_layout((800, 500), 336)
    assert layout.resized == (672, 420) and layout.offset == (0, 126)
    # 500 x 500: only 2x2 (672x672) holds it whole (250000 px); 1x3 keeps 336x336
    assert anyres_grid((500, 500), 336) == (2, 2)


def test_uhd_partitions():
    assert uhd_grid((336, 1344), 336) == (4, 1)  # N = 4; one column of four slices keeps each slice square
    assert uhd_grid((1344, 336), 336) == (1, 4)
    assert uhd_grid((672, 672), 336) == (2, 2)
    assert uhd_grid((300, 300), 336) == (1, 1)  # N = 1: no slicing
    # 1000 x 600 at 336: N = ceil(600000/112896) = 6; candidates of 5, 6, 7 slices; 3 cols x 2 rows gives
    # slices of 333 x 300 (|log 1.11| = 0.105), better than 2x3 (500x200) or 5x1 / 1x5 / 7x1
    assert uhd_grid((1000, 600), 336) == (2, 3)
    scores = {(r, c): abs(math.log((1000 / c) / (600 / r))) for r, c in [(2, 3), (3, 2), (1, 6), (1, 5), (1, 7)]}
    assert min(scores, key=scores.get) == (2, 3)


def test_cut_tiles_and_uhd_slices_cover_the_image():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (672, 672, 3), dtype=np.uint8))
    layout = anyres_layout(image.size, 336)
    tiles = cut_tiles(image, layout)
    assert len(tiles) == 4 and all(t.size == (336, 336) for t in tiles)
    assert np.array_equal(np.asarray(tiles[3]), np.asarray(image)[336:, 336:])  # row-major: bottom right last
    grid, slices = uhd_slices(Image.new("RGB", (336, 1344)), 336)
    assert grid == (4, 1) and [s.size for s in slices] == [(336, 336)] * 4
    # UHD's adapt_size: scale √(576 · 14/300 · 14/500) = 0.8676; ⌊0.8676 · 500/14⌋ = 30, ⌊0.8676 · 300/14⌋ = 18 patches
    assert slice_size((500, 300), 336, 14) == (420, 252)


def test_assemble_places_tiles_removes_padding_and_adds_newlines():
    layout = anyres_layout((800, 500), 336)  # 2x2 grid, image 672x420 at y offset 126
    h = 6  # 6x6 features per tile → 56-pixel cells; content rows 126//56=2 .. ceil(546/56)=10
    tiles = torch.arange(4 * h * h, dtype=torch.float).reshape(4, h, h, 1)
    newline = torch.tensor([-1.0])
    out = assemble(tiles, layout, newline, global_view=torch.full((3, 1), -2.0))
    rows = 10 - 2
    assert out.shape == (rows * (12 + 1) + 3, 1) == (token_count(layout, h, True, 3), 1)
    body = out[3:].reshape(rows, 13)
    assert (body[:, -1] == -1).all() and int((out == -1).sum()) == rows  # one newline per row
    assert (out[:3] == -2).all()  # the global view first, as LLaVA-NeXT
    # the first kept row is feature row 2 of the top tiles: tile 0 then tile 1
    assert body[0, :6].tolist() == tiles[0, 2, :, 0].tolist() and body[0, 6:12].tolist() == tiles[1, 2, :, 0].tolist()
    assert body[-1, :6].tolist() == tiles[2, 3, :, 0].tolist()  # the last kept row: row 9 = tile 2's row 3


def test_changing_one_tile_changes_only_its_tokens():
    layout = anyres_layout((672, 672), 336)
    encode = torch.nn.Conv2d(3, 4, kernel_size=56, stride=56)  # a per-tile encoder: 6x6 cells of 56 px

    def tokens(image):
        pixels = torch.stack(
            [torch.from_numpy(np.asarray(t, dtype=np.float32)).permute(2, 0, 1) / 255 for t in cut_tiles(image, layout)]
        )
        with torch.no_grad():
            return assemble(encode(pixels).permute(0, 2, 3, 1), layout, torch.zeros(4))

    rng = np.random.default_rng(1)
    array = rng.integers(0, 255, (672, 672, 3), dtype=np.uint8)
    before = tokens(Image.fromarray(array))
    array[:336, 336:] = 0  # tile 1 (top right)
    after = tokens(Image.fromarray(array))
    changed = (before != after).any(dim=1).reshape(12, 13)
    assert changed[:6, 6:12].all() and changed.sum() == 36  # exactly tile 1's 6x6 tokens
    with pytest.raises(ValueError, match="tiles for a 2x2 grid"):
        assemble(torch.zeros(3, 6, 6, 4), layout)
