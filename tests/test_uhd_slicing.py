"""LLaVA-UHD's slicing against its own code (`llava_uhd/train/llava-uhd/slice_logic.py`: `cal_num_of_slices`,
`slice_image`, `adapt_size`), each case worked by hand; its default compressor; a fixed count per slice."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from mmbridge.config import ModelConfig
from mmbridge.data.layouts import Tiling
from mmbridge.data.tiling import slice_size, uhd_grid, uhd_slices
from mmbridge.models.build import bridge_options, build_model

S = 336


def test_an_image_with_one_ideal_slice_may_split_in_two():
    # 400x200: N = ⌈80000 / 112896⌉ = 1; candidates 1 (1x1, |log 1 − log 2| = 0.693) and 2 (one column:
    # |log ½ − log 2| = 1.386; two columns: |log 2 − log 2| = 0): two slices side by side
    assert uhd_grid((400, 200), S) == (1, 2)
    # 300x250: |log 1 − log 1.2| = 0.182 beats 2 columns' |log 2 − log 1.2| = 0.511: one view, no slices
    assert uhd_grid((300, 250), S) == (1, 1)
    assert Tiling("uhd").num_views((400, 200), S) == 1 + 2 and Tiling("uhd").num_views((300, 250), S) == 1


def test_n_of_two_always_splits_and_ties_keep_the_first_candidate():
    # 400x400: N = ⌈160000 / 112896⌉ = 2; candidates 2 and 3 only; one column (r = ½) and two columns (r = 2)
    # both score |log 2| exactly: the first, one column of two slices
    assert uhd_grid((400, 400), S) == (2, 1)
    # 800x800: N = 6; count 6's grids 2 columns (r = 2/(6/2) = 0.666…) and 3 columns (r = 3/(6/3) = 1.5) are a
    # tie in exact arithmetic; UHD's floats give |log 0.666…| = 0.40546510810816444 and |log 1.5| =
    # 0.4054651081081644, so three columns (later in its order, but strictly closer) win
    assert abs(math.log(3 / (6 / 3))) < abs(math.log(2 / (6 / 2)))
    assert uhd_grid((800, 800), S) == (2, 3)


def test_the_cap_limits_the_ideal_count_and_n_plus_one_may_pass_it():
    # 2352x336: W·H / S² = 7 → N = min(7, 6) = 6; candidates 5, 6, 7: seven columns match the aspect 7 exactly
    assert uhd_grid((7 * S, S), S) == (1, 7)
    assert Tiling("uhd").max_slices == 6
    assert Tiling("uhd").max_count(S, 64) == 64 * (1 + 6 + 1)  # the overview and N + 1 slices
    # the cap at 2: 1000x600 has N = ⌈5.3⌉ → 2; candidates 2 and 3: three columns (r = 3) vs 5/3 is
    # |log 3 − log(5/3)| = 0.588, two columns 0.182: (1, 2)
    assert uhd_grid((1000, 600), S, max_slices=2) == (1, 2)


def test_slices_are_cut_at_floored_boxes_and_sized_by_adapt_size():
    image = Image.new("RGB", (800, 400))  # N = 3 → candidates 2, 3, 4; log 2: two columns exact → (1, 2)
    grid, slices = uhd_slices(image, S)
    assert grid == (1, 2) and [s.size for s in slices] == [(400, 400), (400, 400)]
    # 1000x200 at S = 336: N = 2 → candidates 2, 3; three columns (r = 3) is closest to 5: boxes at
    # 0, ⌊1000/3⌋ = 333, ⌊2000/3⌋ = 666, 1000 (rounding would put the second cut at 667)
    grid, slices = uhd_slices(Image.new("RGB", (1000, 200)), S)
    assert grid == (1, 3) and [s.size[0] for s in slices] == [333, 333, 334]
    # adapt_size for 333x200 at patch 14: scale = √(576 · 14/200 · 14/333) = 1.3007; ⌊1.3007 · 333/14⌋ = 30 and
    # ⌊1.3007 · 200/14⌋ = 18 patches: 540 of the 576 positions
    assert slice_size((333, 200), S, 14) == (420, 252)
    # a very thin slice: one side at least a patch, the other at most the table's 576 patches
    assert slice_size((10, 5000), S, 14) == (14, 14 * 536)


def test_uhd_defaults_to_the_position_aware_compressor():
    base = {"vision": {}, "lm": {}, "tiling": {"mode": "uhd"}}
    assert bridge_options(ModelConfig(**base, bridge={"name": "resampler"}))["kind"] == "qwen"
    assert bridge_options(ModelConfig(**base, bridge={"name": "resampler", "kind": "perceiver"}))["kind"] == "perceiver"
    assert "kind" not in bridge_options(ModelConfig(vision={}, lm={}, bridge={"name": "resampler"}))


def test_each_slice_keeps_the_count_when_the_resolution_changes(tiny_lm_dir, tiny_clip_dir):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir, "feature_layer": -1},
        bridge={"name": "resampler", "latents": 4, "heads": 4},
        lm={"path": tiny_lm_dir},
        max_length=400,
        system_prompt="",
        tiling={"mode": "uhd"},
    )
    model, proc = build_model(cfg)
    counts = []
    for size in (32, 48):
        if size != model.vision.image_size:
            model.set_image_size(size)
        with torch.no_grad():
            for h, w in ((24, 32), (32, 32), (64, 16), (48, 48)):  # views of their own grids
                out = model.bridge(model.vision.forward_any(torch.randn(1, 3, h, w)), grid=(h // 8, w // 8))
                counts.append(out.shape[1])
        assert model.num_image_tokens == 4
    assert counts == [4] * 8
    with pytest.raises(ValueError, match="resampler"):
        model.bridge(torch.randn(1, 12, 32), grid=(4, 4))
