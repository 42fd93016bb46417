"""Sequence packing: budgets, resumable batches, row layout, and packed = unpacked losses and gradients."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch

from mmbridge.config import ModelConfig, RecipeError, recipe_from_dict
from mmbridge.data.dataset import Collator
from mmbridge.data.packing import PackedBatches, PackingCollator, pack
from mmbridge.models.build import build_model
from mmbridge.models.masks import allowed_attention
from mmbridge.objectives.croc import CrocObjective
from tests.conftest import interrupted_run, tiny_recipe_dict
from tests.rounding import assert_same_math

IGNORE = -100


def conv(question: str, answer: str, n_images: int) -> list[dict]:
    return [{"from": "human", "value": "<image> " * n_images + question}, {"from": "gpt", "value": answer}]


# mixed lengths and image counts, including a text-only sample
CONVS = [
    conv("What colour is the shape?", "red", 1),
    conv(
        "Describe both images in detail, shape by shape, and say which is larger.",
        "the first has a big blue square and a small circle; the second is empty",
        2,
    ),
    conv("hi", "hello there, how can I help you today with your shapes?", 0),
    conv("Where is the triangle? Answer with a box.", "[0.12, 0.40, 0.55, 0.91]", 1),
    conv("Count.", "three", 1),
]


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir, tiny_clip_dir):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge={"name": "pool_adapter", "pooled": 2},
        lm={"path": tiny_lm_dir},
        max_length=160,
        system_prompt="",
    )
    model, proc = build_model(cfg)
    return model.requires_grad_(True), proc


def items(proc):
    g = torch.Generator().manual_seed(0)
    out = []
    for k, c in enumerate(CONVS):
        n = sum(t["value"].count("<image>") for t in c)
        e = proc.encode(c, n)
        out.append(
            {
                "id": str(k),
                "input_ids": e.input_ids,
                "labels": e.labels,
                "pixel_values": torch.randn(n, 3, 32, 32, generator=g),
            }
        )
    return out


def packed_and_padded(proc, budget: int, max_images: int = 0):
    """The same samples as packed rows and as a padded batch, in the same (row-major) order."""
    its = items(proc)
    rows = pack([len(it["input_ids"]) for it in its], [it["pixel_values"].shape[0] for it in its], budget, max_images)
    tagged = [{**its[i], "row": r} for r, row in enumerate(rows) for i in row]
    packed = PackingCollator(proc)(tagged)
    padded = Collator(proc)([its[int(i)] for i in packed["ids"]])
    return packed, padded


def per_sample_losses(model, batch, hidden) -> torch.Tensor:
    """Mean next-token loss of each sample, in the batch's sample order."""
    labels = batch["labels"]
    seg = batch.get("segment_ids", batch["attention_mask"] * torch.arange(1, labels.shape[0] + 1)[:, None])
    losses = []
    for r in range(labels.shape[0]):
        for s in seg[r].unique().tolist():
            if s == 0:
                continue
            mask = torch.full_like(labels, IGNORE)
            mask[r] = torch.where(seg[r] == s, labels[r], IGNORE)
            losses.append(model.target_loss(hidden, mask)[0])
    return torch.stack(losses)


def grads(*modules) -> dict:
    out = {}
    for k, m in enumerate(modules):
        for n, p in m.named_parameters():
            if p.grad is not None:
                out[f"{k}.{n}"] = p.grad.clone()
                p.grad = None
    return out


def assert_close_grads(a: dict, b: dict):
    """Gradients equal up to rounding of the backward pass's sums, whose terms have the largest gradient's scale."""
    assert a.keys() == b.keys() and len(a) > 10
    scale = max(g.abs().max().item() for g in a.values())
    for n in a:
        assert_same_math(b[n], a[n], msg=n, scale=scale)


# -- packing decisions ---------------------------------------------------------------------------
def test_pack_respects_token_and_image_budgets_and_places_every_sample_once():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 60))
        lengths, images = rng.integers(1, 120, n), rng.integers(0, 3, n)
        for max_images in (0, 2, 3):
            rows = pack(lengths, images, 128, max_images)
            assert sorted(sum(rows, [])) == list(range(n))
            assert all(lengths[r].sum() <= 128 for r in rows)
            if max_images:
                assert all(images[r].sum() <= max_images for r in rows)
    # nearly full rows: 3 x 60 + 3 x 40 fit exactly into 3 rows of 100
    assert sorted(sorted(r) for r in pack([60, 60, 60, 40, 40, 40], [0] * 6, 100)) == [[0, 3], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="exceeds the packing budget"):
        pack([10, 200], [0, 0], 128)
    with pytest.raises(ValueError, match="images exceeds"):
        pack([10, 20], [0, 3], 128, max_images=2)


def test_packed_batches_fill_rows_keep_budgets_and_resume_exactly():
    rng = np.random.default_rng(1)
    lengths, images = rng.integers(40, 150, 400), rng.integers(0, 3, 400)
    mix = {"sizes": [150, 250], "weights": [1.0, 2.0], "seed": 5}
    sampler = PackedBatches(lengths, images, mix, rows=4, budget=256, max_images=4, window=8)
    batches = list(islice(iter(sampler), 40))
    real = padded = 0
    for b in batches:
        rows: dict[int, list[int]] = {}
        for i, r in b:
            rows.setdefault(r, []).append(i)
        assert 1 <= len(rows) <= 4
        assert all(lengths[v].sum() <= 256 and images[v].sum() <= 4 for v in rows.values())
        real += sum(lengths[i] for i, _ in b)
        padded += len(rows) * max(lengths[v].sum() for v in rows.values())
    assert real / padded > 0.95
    resumed = list(
        islice(iter(PackedBatches(lengths, images, mix, rows=4, budget=256, max_images=4, window=8, start=13)), 27)
    )
    assert resumed == batches[13:]


def test_row_layout_keeps_images_whole_and_samples_apart(tiny):
    model, proc = tiny
    packed, padded = packed_and_padded(proc, budget=160, max_images=2)
    ids, seg, pos, labels = packed["input_ids"], packed["segment_ids"], packed["position_ids"], packed["labels"]
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum()  # no token lost
    assert ids.shape[0] < padded["input_ids"].shape[0] and ids.shape[1] <= 160
    is_image = ids == model.image_token_id
    k = model.num_image_tokens
    for r in range(ids.shape[0]):
        assert int((seg[r] > 0).sum()) == int(packed["attention_mask"][r].sum())
        n_img = 0
        for s in seg[r].unique().tolist():
            if s == 0:
                continue
            where = torch.nonzero(seg[r] == s).flatten()
            assert torch.equal(pos[r, where], torch.arange(len(where)))  # positions restart per sample
            assert labels[r, where[0]] == IGNORE  # no sample predicts the next one's first token
            n = int(is_image[r, where].sum())
            assert n % k == 0  # every image's tokens are all in this sample
            n_img += n // k
        assert n_img <= 2  # the image budget of the row
    # the row-major sample order is the image order
    assert packed["pixel_values"].shape[0] == int(is_image.sum()) // k
    assert padded["labels"][:, 1:].ne(IGNORE).sum() == labels[:, 1:].ne(IGNORE).sum()


def test_packed_mask_is_block_diagonal_and_per_sample(tiny):
    model, proc = tiny
    packed, _ = packed_and_padded(proc, budget=160)
    seg, is_image = packed["segment_ids"], packed["input_ids"] == model.image_token_id
    for mode in ("causal", "prefix", "visual"):
        allowed = allowed_attention(
            packed["attention_mask"], mode, packed["labels"], is_image, model.num_image_tokens, segment_ids=seg
        )
        cross = seg[:, :, None] != seg[:, None, :]
        assert not (allowed & cross).any(), mode
        for r in range(seg.shape[0]):  # each sample's block equals its own unpacked mask
            for s in seg[r].unique().tolist():
                if s == 0:
                    continue
                w = torch.nonzero(seg[r] == s).flatten()
                alone = allowed_attention(
                    torch.ones(1, len(w), dtype=torch.long),
                    mode,
                    packed["labels"][r : r + 1, w],
                    is_image[r : r + 1, w],
                    model.num_image_tokens,
                )
                assert torch.equal(allowed[r][w][:, w], alone[0]), (mode, r, s)


# -- packed = unpacked ---------------------------------------------------------------------------
def test_packed_losses_and_gradients_equal_unpacked(tiny):
    model, proc = tiny
    packed, padded = packed_and_padded(proc, budget=160)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    normalizer = float(padded["labels"][:, 1:].ne(IGNORE).sum())
    results = []
    for batch in (padded, packed):
        out = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["labels"],
            normalizer=normalizer,
            position_ids=batch.get("position_ids"),
            segment_ids=batch.get("segment_ids"),
        )
        out.loss.backward()
        results.append((per_sample_losses(model, batch, out.hidden_states).detach(), out.loss.detach(), grads(model)))
    (l0, t0, g0), (l1, t1, g1) = results
    assert len(l0) == len(CONVS)
    assert_same_math(l1, l0)
    assert_same_math(t1, t0)
    assert_close_grads(g0, g1)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_block_mask_path_equals_the_dense_path(tiny):
    """Packed rows through flex_attention's BlockMask (the GPU path; forward only on a CPU) give the same hidden
    states and per-sample losses as the dense additive mask; padding rows need no attention."""
    from torch.nn.attention.flex_attention import BlockMask

    from mmbridge.models import packed_attention

    model, proc = tiny
    assert model.lm.config._attn_implementation == "sdpa"  # a CPU model keeps plain SDPA until a block path runs
    packed, _ = packed_and_padded(proc, budget=160)
    packed = {**packed, "attention_mask": packed["attention_mask"].clone()}
    packed["attention_mask"][-1, -3:] = 0  # padding at the end of the last row
    packed["segment_ids"] = packed["segment_ids"] * packed["attention_mask"]
    out = {}
    with torch.no_grad():
        for mode in ("dense", "block"):
            model.packed_attention = mode
            mask = model.packed_mask(packed["segment_ids"], packed["attention_mask"], torch.float32)
            assert isinstance(mask, BlockMask) == (mode == "block")
            out[mode] = model(
                packed["input_ids"],
                packed["attention_mask"],
                packed["pixel_values"],
                labels=None,
                position_ids=packed["position_ids"],
                segment_ids=packed["segment_ids"],
            ).hidden_states
    model.packed_attention = "auto"
    assert model.lm.config._attn_implementation == packed_attention.NAME
    real = packed["attention_mask"].bool()
    assert_same_math(out["block"][real], out["dense"][real])
    assert_same_math(per_sample_losses(model, packed, out["block"]), per_sample_losses(model, packed, out["dense"]))
    # the block mask is exactly block-diagonal causal: the dense mask's pattern, tile by tile
    dense = model.packed_mask(packed["segment_ids"], packed["attention_mask"], torch.float32)[:, 0] == 0
    block = packed_attention.packed_block_mask(packed["segment_ids"], packed["attention_mask"])
    t = packed["segment_ids"].shape[1]
    eye = torch.eye(t, dtype=torch.bool)
    want = dense | eye  # a padding query sees itself
    got = torch.stack(
        [
            block.mask_mod(torch.tensor(b), 0, torch.arange(t)[:, None], torch.arange(t)[None, :])
            for b in range(want.shape[0])
        ]
    )
    assert torch.equal(got, want)


def test_rows_padded_to_a_fixed_width_change_nothing_but_padding(tiny):
    """On a GPU packed rows are padded to max_length (one shape for compiled kernels): same samples, losses."""
    model, proc = tiny
    its = items(proc)
    rows = pack([len(it["input_ids"]) for it in its], [it["pixel_values"].shape[0] for it in its], 160)
    tagged = [{**its[i], "row": r} for r, row in enumerate(rows) for i in row]
    free, fixed = PackingCollator(proc)(tagged), PackingCollator(proc, width=160)(tagged)
    w = free["input_ids"].shape[1]
    assert w < 160 and fixed["input_ids"].shape == (len(rows), 160)
    for key in ("input_ids", "labels", "position_ids", "segment_ids", "attention_mask"):
        assert torch.equal(fixed[key][:, :w], free[key]), key
    assert (fixed["attention_mask"][:, w:] == 0).all() and (fixed["labels"][:, w:] == IGNORE).all()
    with torch.no_grad():
        a, b = (
            model(
                x["input_ids"],
                x["attention_mask"],
                x["pixel_values"],
                x["labels"],
                position_ids=x["position_ids"],
                segment_ids=x["segment_ids"],
            ).loss
            for x in (free, fixed)
        )
    assert_same_math(b, a)


def test_without_the_block_mask_samples_would_leak(tiny):
    """The check above can fail: packed rows with only a padding mask give other losses."""
    model, proc = tiny
    packed, padded = packed_and_padded(proc, budget=160)
    with torch.no_grad():
        ok = model(
            packed["input_ids"],
            packed["attention_mask"],
            packed["pixel_values"],
            labels=None,
            position_ids=packed["position_ids"],
            segment_ids=packed["segment_ids"],
        ).hidden_states
        leak = model(
            packed["input_ids"],
            packed["attention_mask"],
            packed["pixel_values"],
            labels=None,
            position_ids=packed["position_ids"],
        ).hidden_states
    assert not torch.allclose(per_sample_losses(model, packed, ok), per_sample_losses(model, packed, leak), atol=1e-3)


@pytest.mark.parametrize("attention", ["prefix", "visual"])
def test_packed_croc_losses_and_gradients_equal_unpacked(tiny, attention):
    model, proc = tiny
    torch.manual_seed(0)
    objective = CrocObjective(
        model, pool_size=64, attention=attention, allow_unnormalised=True, head_dropout=0.0
    )  # packed and unpacked compared: no dropout masks
    packed, padded = packed_and_padded(proc, budget=160)
    normalizer = float(padded["labels"][:, 1:].ne(IGNORE).sum())
    results = []
    for batch in (padded, packed):
        torch.manual_seed(1)  # the same token selection: images come in the same order
        out = objective(model, batch, normalizer=normalizer)
        out.loss.backward()
        results.append((out.loss.detach(), out.terms, grads(model, objective)))
    (t0, terms0, g0), (t1, terms1, g1) = results
    assert_same_math(t1, t0)
    assert_same_math(torch.as_tensor(terms1["recon"]), torch.as_tensor(terms0["recon"]))
    assert_close_grads(g0, g1)
    # and each sample's LM loss under the mixed mask
    hidden = []
    for batch in (padded, packed):
        torch.manual_seed(1)
        with torch.no_grad():
            inputs = objective.prepare(model, batch)
            h = model.lm.get_decoder()(
                inputs_embeds=inputs.embeds, attention_mask=inputs.mask, position_ids=batch.get("position_ids")
            ).last_hidden_state
        hidden.append(per_sample_losses(model, batch, h))
    assert_same_math(hidden[1], hidden[0])


# -- the recipe switch -----------------------------------------------------------------------------
def test_pack_option_is_checked(tiny_lm_dir, tiny_clip_dir, world):
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["stages"][0].update(pack=True, group_by_length=4)
    with pytest.raises(RecipeError, match="exclude each other"):
        recipe_from_dict(data)
    data["stages"][0].update(group_by_length=0, objective={"name": "blip2"})
    with pytest.raises(RecipeError, match="packing works with"):
        recipe_from_dict(data)


def test_packed_stage_trains_and_resumes_with_the_same_losses(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    from mmbridge.train.trainer import Trainer

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["stages"] = [{**data["stages"][1], "pack": True, "pack_images": 3, "batch_size": 2, "steps": 4}]
    data["save_every"] = 2
    recipe = recipe_from_dict(data)
    trainer = Trainer(recipe, tmp_path / "a", progress=False)
    batch = next(iter(trainer.loader(recipe.stages[0], 0)[0]))
    assert batch["input_ids"].shape[0] <= 2 and len(batch["ids"]) > 2  # several samples per row
    assert batch["pixel_values"].shape[0] <= 6  # at most 3 images per row
    trainer.run()
    interrupted_run(recipe, tmp_path / "b", 4)  # during step 4; the checkpoint is at step 2
    Trainer(recipe, tmp_path / "b", resume=True, progress=False).run()

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows}

    want, got = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(want) == [1, 2, 3, 4] and sorted(got) == sorted(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), k
