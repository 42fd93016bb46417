"""AnyRes against LLaVA-NeXT's own rules (`llava/mm_utils.py`, `llava/model/llava_arch.py`), each case worked by
hand: the candidate choice and its tie order, the resize, the unpadding, the global view first, anyres_max_N."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.data.anyres import assemble, max_grid, token_count
from mmbridge.data.layouts import Tiling
from mmbridge.data.tiling import ANYRES_GRIDS, anyres_grid, anyres_layout, pinpoint_grids
from tests.rounding import assert_same_math


def test_candidates_follow_llava_next_pinpoints_and_its_tie_rule():
    # llava-v1.6's pinpoints [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] are (width, height)
    assert ANYRES_GRIDS == ((2, 1), (1, 2), (2, 2), (1, 3), (3, 1))
    # 200x100 fits whole in every candidate (effective 20000); waste 336·672 − 20000 for 2x1 and 1x2 alike:
    # the first listed keeps it, two rows of one tile, although the image is wide
    assert anyres_grid((200, 100), 336) == (2, 1)
    # 700x300: 2x1 (336x672) scale 0.48 → 336·144; 1x2 (672x336) scale 0.96 → 672·288 = 193536;
    # 2x2 scale 0.96 → the same 193536 but wastes 451584 − 193536 more; 1x3 (1008x336) scale 1.12 → all 210000
    assert anyres_grid((700, 300), 336) == (1, 3)
    # 500x500: 2x2 keeps all 250000 (scale 1.344); the others keep 336·336 at most
    assert anyres_grid((500, 500), 336) == (2, 2)


def test_pinpoints_are_width_height_and_the_range_form_spans_six_by_six():
    assert pinpoint_grids([[1, 2], [3, 1]]) == ((2, 1), (1, 3))  # (width, height) → (rows, cols)
    grids = pinpoint_grids("(1x1),...,(6x6)")  # LLaVA-OneVision: widths outer, heights inner
    assert len(grids) == 36 and grids[:3] == ((1, 1), (2, 1), (3, 1)) and grids[-1] == (6, 6)
    tiling = Tiling("anyres", pinpoints="(1x1),...,(6x6)")
    assert tiling.grids == grids and anyres_grid((2000, 2000), 336, grids) == (6, 6)
    assert tiling.num_views((2000, 2000), 336) == 1 + 36
    # a 700x300 image: 3x1 tiles (width 3, height 1) keep it all (scale 1.12) with the least waste
    assert anyres_grid((700, 300), 336, grids) == (1, 3)
    with pytest.raises(ValueError, match="not both"):
        Tiling("anyres", grids=[[1, 2]], pinpoints=[[2, 1]])


def test_resize_fills_one_side_and_rounds_the_other_up():
    # 462x133 → 1x2 (672x336): scale_w = 672/462 < scale_h: width 672, height ⌈133·672/462⌉ = ⌈193.45⌉ = 194
    # (rounding to nearest would give 193), centred at y = (336 − 194) // 2 = 71
    layout = anyres_layout((462, 133), 336)
    assert (layout.rows, layout.cols, layout.resized, layout.offset) == (1, 2, (672, 194), (0, 71))
    # 211x252 → 2x1 (336x672): scale_w = 336/211 < scale_h = 672/252: width 336, height ⌈252·336/211⌉ = 402
    assert anyres_layout((211, 252), 336).resized == (336, 402)


def test_unpad_keeps_the_floor_extent_and_cuts_padding_evenly():
    # 771x411 in 2x2 at S = 336 with 6x6 features per tile (56 px cells): a 12x12 map; the image is wider
    # (771/411 > 1), so rows were padded: its height at the map's scale is ⌊411·12/771⌋ = 6, and (12 − 6) // 2 = 3
    # rows go from each side: rows 3..9 (a pixel-extent rule rounding outwards would keep rows 2..10)
    layout = anyres_layout((771, 411), 336)
    assert (layout.rows, layout.cols) == (2, 2)
    assert layout.content_cells(56) == (slice(3, 9), slice(0, 12))
    # 800x500: ⌊500·12/800⌋ = 7 rows; (12 − 7) // 2 = 2 from each side keeps 8, one more than 7
    assert anyres_layout((800, 500), 336).content_cells(56) == (slice(2, 10), slice(0, 12))
    # 977x1370 is taller (977/1370 < 1): ⌊977·12/1370⌋ = 8 columns, (12 − 8) // 2 = 2 from each side
    assert anyres_layout((977, 1370), 336).content_cells(56) == (slice(0, 12), slice(2, 10))


def test_unpad_agrees_with_transformers_unpad_image():
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = (int(x) for x in rng.integers(20, 1500, 2))
        layout = anyres_layout((w, h), 336)
        rows, cols = layout.content_cells(56)
        got = unpad_image(torch.zeros(1, layout.rows * 6, layout.cols * 6), (h, w)).shape[1:]
        assert got == (rows.stop - rows.start, cols.stop - cols.start), (w, h)


def test_the_global_view_comes_first():
    tiling, rng = Tiling("anyres"), np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8))  # 64x40 → 2x2 at S = 32
    views = tiling.views(image, 32)
    assert len(views) == 5 and np.array_equal(np.asarray(views[0]), np.asarray(image.resize((32, 32), Image.BICUBIC)))
    index = tiling.token_index((64, 40), 32, 16)  # 4x4 tokens per view: the 8x8 map keeps rows 1..7
    assert index[:16].tolist() == list(range(16))
    # the first kept map row is feature row 1 of tiles 0 and 1 (views 1 and 2): 16 + 4..8, 32 + 4..8, newline
    assert index[16:25].tolist() == [20, 21, 22, 23, 36, 37, 38, 39, -1]


def test_anyres_max_shrinks_a_large_map_bilinearly():
    # anyres_max_9 with 27x27 features per view (LLaVA-OneVision): t = √(h·w / (9·27²)); a 2x2 map unpadded to
    # 108x81 gives t = √(8748/6561) = 1.1547 > 1.1 → ⌊108 / t⌋ x ⌊81 / t⌋ = 93 x 70; 81x81 gives t = 1 → kept
    assert max_grid(108, 81, 9, 27) == (93, 70) and max_grid(81, 81, 9, 27) == (81, 81)
    assert max_grid(108, 81, None, 27) == (108, 81)
    # 4 x 4 features per tile, 2x2 tiles, anyres_max_1: the 8x8 map has t = √(64/16) = 2 → 4x4
    layout = anyres_layout((64, 64), 32, grids=[(2, 2)])
    tiles = torch.randn(4, 4, 4, 3, generator=torch.Generator().manual_seed(0))
    out = assemble(tiles, layout, torch.zeros(3), max_views=1)
    assert out.shape == (4 * 5, 3) == (token_count(layout, 4, True, 0, max_views=1), 3)
    full = assemble(tiles, layout).reshape(8, 8, 3)
    # halving with bilinear (align_corners False): each output samples at 2i + 0.5, the mean of a 2x2 block
    want = full.reshape(4, 2, 4, 2, 3).mean((1, 3))
    # four fp32 terms of magnitude ≤ max|x|, weights 1/4: each sum is off by at most a few units of rounding
    assert_same_math(out.reshape(4, 5, 3)[:, :4], want, rel=4 * 2.0**-23)


def test_bilinear_taps_by_hand():
    from mmbridge.data.layouts import bilinear_taps

    rows, weights = bilinear_taps(8, 3)  # scale 8/3: sources at 0.8333, 3.5, 6.1667
    assert rows.tolist() == [[0, 1], [3, 4], [6, 7]]
    # float32 as torch: three operations (8/3, its product, the subtraction) below 8 = 2^3, each off by at most
    # half a unit in the last place there (2^-21)
    assert np.allclose(weights, [[1 / 6, 5 / 6], [0.5, 0.5], [5 / 6, 1 / 6]], rtol=0, atol=3 * 2.0**-21)
    rows, weights = bilinear_taps(4, 4)  # the same size: each output its own source
    assert rows[:, 0].tolist() == [0, 1, 2, 3] and (weights[:, 0] == 1).all()


@pytest.fixture(scope="module")
def shrinking(tiny_lm_dir, tiny_clip_dir):
    from mmbridge.config import ModelConfig
    from mmbridge.models.build import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge={"name": "mlp"},
        lm={"path": tiny_lm_dir},
        max_length=400,
        system_prompt="",
        tiling={"mode": "anyres", "anyres_max": 1},
    )
    model, proc = build_model(cfg)
    return model.eval(), proc


def test_anyres_max_through_the_processor_equals_interpolating_the_map(shrinking):
    model, proc = shrinking  # 16 tokens (4x4) per 32-pixel view; anyres_max_1: t = √(h·w / 16)
    # 64x64 → 2x2, an 8x8 map, t = 2 → 4x4; 64x40 → 2x2, unpadded 6x8, t = √3 → ⌊6/√3⌋ x ⌊8/√3⌋ = 3x4;
    # 32x96 → 3x1, a 12x4 map, t = √3 → 6x2; 20x20 → 2x1 (the first pinpoint), unpadded 4x4, t = 1: kept
    counts = {(64, 64): 16 + 4 * 5, (64, 40): 16 + 3 * 5, (32, 96): 16 + 6 * 3, (20, 20): 16 + 4 * 5}
    rng = np.random.default_rng(4)
    for size, n in counts.items():
        image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        views = proc.images([image])
        assert views["counts"] == [n] and views["visual_index"].shape == (n, 8), size
        with torch.no_grad():
            own = model.encode_images(views["pixel_values"])
            got = model.place_visual(own, views["visual_index"])
            layout = anyres_layout(image.size, 32)
            k = layout.rows * layout.cols
            want = assemble(own[1:].reshape(k, 4, 4, -1), layout, model.bridge.image_newline, own[0], max_views=1)
        assert_same_math(got, want, msg=str(size))  # four-term sums in another order than torch's


def test_anyres_max_batches_shift_rows_and_keep_weights(shrinking):
    from mmbridge.data.dataset import Collator

    model, proc = shrinking
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in ((64, 40), (32, 96))]
    items = []
    for im in images:
        views = proc.images([im])
        enc = proc.encode(
            [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "a"}], 1, counts=views["counts"]
        )
        items.append(
            {"id": "x", "input_ids": enc.input_ids, "labels": enc.labels, **views, "image_counts": views["counts"]}
        )
    batch = Collator(proc)(items)
    with torch.no_grad():
        embeds, _ = model.prepare(batch["input_ids"], batch["pixel_values"], visual_index=batch["visual_index"])
        alone = [model.place_visual(model.encode_images(it["pixel_values"]), it["visual_index"]) for it in items]
    is_image = batch["input_ids"] == model.image_token_id
    assert_same_math(embeds[is_image], torch.cat(alone))
