"""A frozen encoder's remembered outputs: the same features, losses and runs as encoding every time."""

from __future__ import annotations

import json

import pytest
import torch

from mmbridge.config import recipe_from_dict
from mmbridge.models.feature_cache import FeatureCache
from mmbridge.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict


@pytest.fixture
def frozen(tiny):
    """The tiny composite with its encoder frozen (as a stage with `vision: frozen` leaves it)."""
    model, proc = tiny
    flags = [p.requires_grad for p in model.vision.parameters()]
    model.vision.requires_grad_(False)
    yield model, proc
    for p, flag in zip(model.vision.parameters(), flags):
        p.requires_grad_(flag)
    model.feature_cache = None


def counted(module):
    """Wrap `module.forward` to count the images it encodes."""
    seen = []
    forward = module.forward
    module.forward = lambda px, *a, **k: (seen.append(px.shape[0]), forward(px, *a, **k))[1]
    return seen


def test_cached_features_equal_the_encoders_and_skip_seen_images(frozen):
    model, _ = frozen
    torch.manual_seed(0)
    px = torch.randn(5, 3, 32, 32)
    want = model.vision_features(px)
    model.feature_cache = FeatureCache()
    seen = counted(model.vision)
    try:
        first = model.vision_features(px[:3])
        mixed = model.vision_features(px[[4, 0, 3, 2]])  # two seen, two new, out of order
        again = model.vision_features(px)
    finally:
        del model.vision.forward
        model.feature_cache = None
    assert seen == [3, 2]  # every image encoded once
    # a remembered image gives exactly what the encoder gave it the first time
    assert torch.equal(mixed[[1, 3]], first[[0, 2]]) and torch.equal(again[:3], first)
    assert torch.equal(again[[4, 3]], mixed[[0, 2]])
    # and that is the encoder's output for it in any batch, up to the order the kernels for another batch size sum
    # in: 2 layers of fp32 sums of <= 64 terms (each within 64 * 2^-24 = 3.8e-6 of the exact sum, relatively)
    # over features of order 1, a few such sums in sequence per layer: 1e-5
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


def test_a_changed_pixel_is_a_new_key_and_a_training_encoder_bypasses_the_cache(frozen):
    model, _ = frozen
    cache = FeatureCache()
    px = torch.rand(2, 3, 32, 32)
    nudged = px.clone()
    nudged[1, 2, 31, 31] += 1e-3
    assert cache.keys(px)[0] == cache.keys(nudged)[0] and cache.keys(px)[1] != cache.keys(nudged)[1]
    assert cache.keys(px[1:]) == cache.keys(px)[1:]  # a key does not depend on the rest of the batch

    model.feature_cache = cache
    try:
        model.vision_features(px)
        assert len(cache.store) == 2
        model.vision.train()  # e.g. a stage that trains the encoder
        model.vision_features(px)
        assert len(cache.store) == 0  # dropped: its outputs are about to change
    finally:
        model.vision.eval()
        model.feature_cache = None


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows]


def test_a_run_with_the_cache_logs_the_losses_of_one_without(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    runs = {}
    for cache in (False, True):
        data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
        data["model"]["feature_cache"] = cache
        for st in data["stages"]:
            st["steps"] = 12  # 48 samples of 40 images: later batches repeat images
        trainer = Trainer(recipe_from_dict(data), tmp_path / str(cache), progress=False)
        trainer.run()
        runs[cache] = losses(tmp_path / str(cache))
        if cache:
            stats = trainer.model.feature_cache
            assert stats.hits > 0 and stats.misses <= 40 + 8  # train images once (+ any held-out ones)
    assert [x[:2] for x in runs[True]] == [x[:2] for x in runs[False]]
    for (s, k, got), (_, _, want) in zip(runs[True], runs[False]):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (s, k)


def test_flops_leave_out_a_cached_frozen_encoder(frozen):
    from mmbridge.train.flops import StepFlops

    model, _ = frozen
    encoding = StepFlops(model).image
    model.feature_cache = FeatureCache()
    cached = StepFlops(model).image
    model.feature_cache = None
    vision_forward = StepFlops._per_image(model, model.vision.image_size)[0]
    assert cached > 0 and encoding - cached == vision_forward  # the bridge still counts
