"""A token count per image, end to end, with LLaVA-NeXT's AnyRes: processor, splicing, packing, masks, dataset
index, FLOPs, training, load_run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.config import ModelConfig, recipe_from_dict
from mmbridge.data.anyres import assemble
from mmbridge.data.dataset import Collator, ConversationDataset
from mmbridge.data.layouts import Tiling
from mmbridge.data.packing import PackingCollator, pack
from mmbridge.data.tiling import anyres_grid, anyres_layout
from mmbridge.models.build import build_model
from mmbridge.models.masks import allowed_attention, image_spans
from mmbridge.runs import load_run
from mmbridge.train.flops import StepFlops
from mmbridge.train.trainer import Trainer
from tests.conftest import assert_batched_answers_equal_alone, assert_served_batch_equals_alone, tiny_recipe_dict
from tests.rounding import assert_same_math

IGNORE = -100
# (width, height) → tokens for the tiny tower (32 px, 4x4 grid) and the mlp bridge (16 tokens per view):
# 64x64: 16 global + a 2x2 grid, an 8x8 map, 8 rows of 8 + newline = 88
# 32x96: 16 + 3x1 (rows x cols), a 12x4 map: 12 x 5 = 76
# 64x40: 16 + 2x2; unpad: 40·8 // 64 = 5 rows of the 8 hold the image, (8 - 5) // 2 = 1 cut each side: 6 x 9 = 70
SIZES = {(64, 64): 88, (32, 96): 76, (64, 40): 70}


def picture(size, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def conv(n_images: int, question: str = "What is there?", answer: str = "a red circle") -> list[dict]:
    return [{"from": "human", "value": "<image>\n" * n_images + question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def tiled(tiny_lm_dir, tiny_clip_dir):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge={"name": "mlp"},
        lm={"path": tiny_lm_dir},
        max_length=400,
        system_prompt="",
        tiling={"mode": "anyres"},
    )
    model, proc = build_model(cfg)
    return model.eval(), proc


def sample(proc, images, **kw):
    """A training item as the dataset gives it."""
    views = proc.images(images)
    enc = proc.encode(conv(len(images), **kw), len(images), counts=views["counts"])
    return {
        "id": "x",
        "input_ids": enc.input_ids,
        "labels": enc.labels,
        "pixel_values": views["pixel_values"],
        "visual_index": views["visual_index"],
        "views": views["views"],
        "image_counts": views["counts"],
    }


def test_layouts_and_counts():
    tiling = Tiling("anyres")
    assert anyres_grid((672, 672), 336) == (2, 2) and tiling.num_views((672, 672), 336) == 5  # 2x2 + global view
    assert anyres_grid((336, 1344), 336, grids=[(1, 2), (2, 1), (2, 2), (4, 1), (1, 4)]) == (4, 1)  # one column
    for size, n in SIZES.items():
        assert tiling.count(size, 32, 16) == n, size
    index = tiling.token_index((64, 40), 32, 16)
    assert int((index == -1).sum()) == 6 and (index[:16] == np.arange(16)).all()  # 6 rows, global view first
    assert Tiling().count((999, 10), 32, 16) == 16  # untiled: the bridge's count for every image
    with pytest.raises(ValueError, match="model.tiling.mode"):
        Tiling("tiles")
    with pytest.raises(ValueError, match="square g×g map"):
        tiling.check(32, 12)


def test_processor_expands_each_image_by_its_own_count(tiled):
    model, proc = tiled
    images = [picture(s, k) for k, s in enumerate(SIZES)]
    views = proc.images(images)
    assert views["counts"] == list(SIZES.values()) and views["views"] == 5 + 4 + 5
    assert views["pixel_values"].shape == (14, 3, 32, 32) and len(views["visual_index"]) == sum(SIZES.values())
    enc = proc.encode(conv(3), 3, counts=views["counts"])
    ids = np.asarray(enc.input_ids)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, ids == proc.image_token_id, 0])))[::2]
    assert runs.tolist() == list(SIZES.values())  # each <image> is its own image's span, in order
    ((n, cut),) = proc.measure_many([(conv(3), 3, "s", views["counts"])])
    assert n == len(ids) and not cut
    prompt = proc.encode_prompt(conv(3)[:1], views["counts"])
    assert prompt.count(proc.image_token_id) == sum(SIZES.values())
    with pytest.raises(Exception, match="expected 234 \\(88 \\+ 76 \\+ 70\\)"):
        proc.encode(conv(2), 3, counts=views["counts"])


def test_a_mixed_batch_fills_every_image_slot_in_order(tiled):
    model, proc = tiled
    images = [picture(s, k) for k, s in enumerate(SIZES)]
    batch = Collator(proc)([sample(proc, images[:1]), sample(proc, images[1:])])
    with torch.no_grad():
        embeds, _ = model.prepare(batch["input_ids"], batch["pixel_values"], visual_index=batch["visual_index"])
        is_image = batch["input_ids"] == model.image_token_id
        assert is_image.sum(1).tolist() == [88, 76 + 70]
        newline = model.bridge.image_newline
        want = []
        for im in images:  # each image alone: its tiles' maps placed, padding cut, newlines, then the global view
            own = model.encode_images(proc.images([im])["pixel_values"])
            layout = anyres_layout(im.size, 32)
            n = layout.rows * layout.cols
            want.append(assemble(own[1:].reshape(n, 4, 4, -1), layout, newline, own[0]))  # view 0: global
    assert_same_math(embeds[is_image], torch.cat(want))
    assert int((embeds[is_image] == newline).all(-1).sum()) == 8 + 12 + 6  # one newline per kept row
    assert torch.equal(batch["image_counts"], torch.tensor(list(SIZES.values())))


def test_changing_one_tile_changes_only_its_tokens(tiled):
    model, proc = tiled
    array = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)

    def tokens(a):
        views = proc.images([Image.fromarray(a)])
        with torch.no_grad():
            return model.place_visual(model.encode_images(views["pixel_values"]), views["visual_index"])

    before = tokens(array)
    array[:32, 32:] = 0  # tile 1, top right
    after = tokens(array)
    changed = (before != after).any(-1)
    body = changed[16:].reshape(8, 9)
    want = torch.zeros(8, 9, dtype=torch.bool)
    want[:4, 4:8] = True
    assert torch.equal(body, want)  # exactly that tile's 4x4 tokens; no newline changes
    assert changed[:16].all()  # and the global view (first), which sees the whole image


def test_packed_rows_with_different_counts_leak_nothing_and_match_unpacked(tiled):
    model, proc = tiled
    model.requires_grad_(True)
    images = [picture(s, k) for k, s in enumerate(SIZES)]
    its = [
        sample(proc, images[:1]),
        sample(proc, images[1:2], answer="two blue squares"),
        sample(proc, images[2:], answer="nothing"),
        sample(proc, [], answer="hello"),
    ]
    rows = pack([len(it["input_ids"]) for it in its], [len(it["image_counts"]) for it in its], budget=260)
    assert len(rows) < len(its)
    tagged = [{**its[i], "row": r} for r, row in enumerate(rows) for i in row]
    order = [i for row in rows for i in row]
    packed, padded = PackingCollator(proc)(tagged), Collator(proc)([its[i] for i in order])
    seg, is_image = packed["segment_ids"], packed["input_ids"] == model.image_token_id
    spans = image_spans(is_image, packed["image_counts"])
    counts = torch.bincount(spans[is_image])
    assert counts.tolist() == packed["image_counts"].tolist()  # each image one block of its own count
    for mode in ("causal", "visual"):
        allowed = allowed_attention(
            packed["attention_mask"], mode, packed["labels"], is_image, packed["image_counts"], segment_ids=seg
        )
        assert not (allowed & (seg[:, :, None] != seg[:, None, :])).any(), mode
    normalizer = float(padded["labels"][:, 1:].ne(IGNORE).sum())
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        out = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["labels"],
            normalizer=normalizer,
            position_ids=batch.get("position_ids"),
            segment_ids=batch.get("segment_ids"),
            visual_index=batch["visual_index"],
        )
        out.loss.backward()
        results.append((out.loss.detach(), model.bridge.image_newline.grad.clone()))
    model.zero_grad()
    model.requires_grad_(False)
    assert_same_math(results[1][0], results[0][0])  # packed = padded, loss and the newline's gradient
    assert_same_math(results[1][1], results[0][1])
    assert results[0][1].abs().sum() > 0  # the newline learns


def test_flops_count_every_view(tiled):
    model, proc = tiled
    batch = Collator(proc)([sample(proc, [picture((64, 64), 0), picture((32, 96), 1)])])
    flops = StepFlops(model)
    no_images = {**batch, "pixel_values": batch["pixel_values"][:0]}
    assert flops(batch) - flops(no_images) == 9 * flops.image > 0  # 5 + 4 views


def test_dataset_index_counts_each_image(tiled, tmp_path):
    model, proc = tiled
    records = []
    for k, size in enumerate(SIZES):
        picture(size, k).save(tmp_path / f"{k}.png")
        records.append({"id": str(k), "image": f"{k}.png", "conversations": conv(1)})
    (tmp_path / "data.json").write_text(json.dumps(records))
    ds = ConversationDataset(tmp_path / "data.json", tmp_path, proc, cache=False)
    base = len(proc.encode(conv(0), 0).input_ids) - 1  # the text around one image-token span ("<image>\n" → "\n")
    for k, n in enumerate(SIZES.values()):
        item = ds[k]
        assert ds.lengths[k] == len(item["input_ids"]) and item["input_ids"].count(proc.image_token_id) == n
        assert abs(len(item["input_ids"]) - n - base) <= 2
    batch = Collator(proc)([ds[0], ds[2]])
    assert len(batch["visual_index"]) == 88 + 70 and batch["pixel_values"].shape[0] == 10


def test_anyres_trains_and_reloads(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"], bridge={"name": "mlp"})
    data["model"]["tiling"] = {"mode": "anyres"}
    data["model"]["max_length"] = 200
    for stage in data["stages"]:
        stage["steps"] = 2
    trainer = Trainer(recipe_from_dict(data), tmp_path / "run", progress=False)
    start = trainer.model.bridge.image_newline.detach().clone()
    trainer.run()
    trained = trainer.model.bridge.image_newline.detach()
    assert not torch.equal(trained, start)  # the newline trains with the bridge
    model, proc = load_run(tmp_path / "run", device="cpu")
    assert torch.equal(model.bridge.image_newline, trained) and proc.tiling.mode == "anyres"
    image = Image.open(sorted(Path(world["images"]).rglob("*.png"))[0])
    views = proc.images([image])
    ids = torch.tensor([proc.encode(conv(1), 1, counts=views["counts"]).input_ids])
    with torch.no_grad():
        a = model(ids, pixel_values=views["pixel_values"], visual_index=views["visual_index"]).hidden_states
        b = trainer.model.eval()(ids, pixel_values=views["pixel_values"], visual_index=views["visual_index"])
    assert torch.equal(a, b.hidden_states)
    assert views["counts"] == [16 + 4 * 5]  # global; 32x32 in a 2x1 canvas (LLaVA-NeXT's tie): 4 of 8 rows kept


def test_croc_selects_within_each_images_own_count(tiled):
    from mmbridge.objectives.croc import CrocObjective, num_selected

    model, proc = tiled
    model.requires_grad_(True)
    images = [picture(s, k) for k, s in enumerate(SIZES)]
    batch = Collator(proc)([sample(proc, images[:1]), sample(proc, images[1:])])
    obj = CrocObjective(model, pool_size=128, attention="visual", allow_unnormalised=True, head_dropout=0.0)
    assert obj.num_tokens == model.max_image_tokens == 8 * 9 + 16  # the largest layout: 2x2 without padding
    torch.manual_seed(0)
    inputs = obj.prepare(model, batch)
    with torch.no_grad():
        plain = model.place_visual(model.encode_images(batch["pixel_values"]), batch["visual_index"])
    replaced = (inputs.embeds[inputs.is_image] != plain).any(-1)
    per_image = torch.stack([c.sum() for c in replaced.split(list(SIZES.values()))])
    assert per_image.tolist() == [num_selected(n, 0.75) for n in SIZES.values()]
    for row, n in zip(inputs.assignment, SIZES.values()):  # one-to-one within each image
        real = row[: num_selected(n, 0.75)]
        assert len(real.unique()) == len(real)
    out = obj(model, batch, normalizer=None)
    out.loss.backward()
    assert torch.isfinite(out.loss) and obj.head.position.grad.abs().sum() > 0
    assert model.bridge.image_newline.grad is not None
    model.zero_grad()
    model.requires_grad_(False)


@pytest.mark.parametrize("target", ["all", "selected"])
def test_croc_with_one_count_for_all_matches_the_fixed_count_path(tiny, target):
    from mmbridge.objectives.croc import CrocObjective

    model, proc = tiny  # pool-adapter, 4 tokens per image, untiled
    ims = [picture((32, 32), k) for k in range(3)]
    its = [{**proc.images(ims[:2]), "id": "a"}, {**proc.images(ims[2:]), "id": "b"}]
    for it, n in zip(its, (2, 1)):
        enc = proc.encode(conv(n), n)
        it.update(input_ids=enc.input_ids, labels=enc.labels)
    batch = Collator(proc)(its)
    ragged = {**batch, "image_counts": torch.full((3,), model.num_image_tokens)}
    obj = CrocObjective(
        model, pool_size=16, attention="prefix", target=target, allow_unnormalised=True, head_dropout=0.0
    )  # paths compared: no dropout masks
    results = []
    for b in (batch, ragged):
        torch.manual_seed(1)
        inputs = obj.prepare(model, b)
        hidden = model.lm.get_decoder()(inputs_embeds=inputs.embeds, attention_mask=inputs.mask).last_hidden_state
        results.append((inputs.embeds, inputs.mask, inputs.selected, obj.reconstruction_loss(hidden, inputs)))
    (embeds, mask, selected, loss), want = results
    assert torch.equal(mask, want[1]) and torch.equal(selected, want[2])  # built from indices: exact
    assert_same_math(embeds, want[0])
    assert_same_math(loss, want[3])


def test_a_tiled_run_changes_resolution_and_resumes_inside_the_larger_stage(
    tiny_lm_dir, tiny_clip_dir, world, tmp_path
):
    from tests.conftest import interrupted_run

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"], bridge={"name": "mlp"})
    data["model"].update(tiling={"mode": "anyres"}, max_length=320)
    data["save_every"] = 2
    data["stages"][0]["steps"] = 2
    data["stages"][1].update(image_size=48, steps=4)
    recipe = recipe_from_dict(data)
    full = Trainer(recipe, tmp_path / "a", progress=False)
    full.run()
    # 32x32 at S = 48: a 2x1 canvas (48x96) holds it at 48x48 in the middle: 6 of 12 rows, 6 columns, + 36 global
    assert full.processor.image_size == 48 and full.processor.image_counts([(32, 32)]) == [6 * 7 + 36]
    interrupted_run(recipe, tmp_path / "b", 2 + 4)  # inside stage 2 (last checkpoint: stage 2, step 2)
    resumed = Trainer(recipe, tmp_path / "b", resume=True, progress=False)
    assert resumed.model.vision.image_size == 48 and resumed.processor.num_image_tokens == 36
    resumed.run()
    rows = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"}
    want = {(r["stage"], r["step"]): r["loss"] for r in rows["a"]}
    got = {(r["stage"], r["step"]): r["loss"] for r in rows["b"]}
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    model, proc = load_run(tmp_path / "a", device="cpu")
    assert proc.image_size == 48 and torch.equal(model.bridge.image_newline, full.model.bridge.image_newline)


def test_generation_reads_each_images_own_count(tiled, tmp_path):
    model, proc = tiled
    records = []
    for k, size in enumerate(SIZES):
        picture(size, k).save(tmp_path / f"{k}.png")
        records.append({"id": str(k), "image": f"{k}.png", "conversations": conv(1)})
    assert_batched_answers_equal_alone(model, proc, records, tmp_path, batch_size=3)


def test_the_serving_engine_batches_images_of_their_own_counts(tiled):
    model, proc = tiled
    assert_served_batch_equals_alone(model, proc, [picture(size, k) for k, size in enumerate(SIZES)], conv(1)[:1], 3)


def test_answer_ranking_scores_each_candidate_with_its_images_own_count(tiled, tmp_path):
    from mmbridge.eval.choice import score_candidates
    from mmbridge.eval.evaluate import prompt_turns

    model, proc = tiled
    records = []
    for k, size in enumerate(SIZES):
        picture(size, k).save(tmp_path / f"{k}.png")
        records.append({"id": str(k), "image": f"{k}.png", "conversations": conv(1)})
    cands = [["red", "a blue square"], ["two"], ["yes", "no", "three circles"]]
    got = score_candidates(model, proc, records, cands, tmp_path, batch_size=4, progress=False)
    for k, (r, options, scores) in enumerate(zip(records, cands, got)):
        views = proc.images([Image.open(tmp_path / f"{k}.png").convert("RGB")])
        prompt = len(proc.encode_prompt(prompt_turns(r), views["counts"]))
        for answer, (logprob, n) in zip(options, scores):
            enc = proc.encode([*prompt_turns(r), {"from": "gpt", "value": answer}], 1, counts=views["counts"])
            labels = torch.tensor([y if t >= prompt else IGNORE for t, y in enumerate(enc.labels)])[None]
            with torch.no_grad():
                out = model(
                    torch.tensor([enc.input_ids]),
                    None,
                    views["pixel_values"],
                    labels,
                    normalizer=1.0,
                    visual_index=views["visual_index"],
                )
            assert n == int(out.num_targets) and logprob == pytest.approx(-float(out.loss), rel=1e-5, abs=1e-5)


def test_image_reliance_gives_each_image_its_own_count(tiled, tmp_path):
    from mmbridge.eval.reliance import image_reliance

    model, proc = tiled
    records = []
    for k, size in enumerate(SIZES):
        picture(size, k).save(tmp_path / f"{k}.png")
        records.append({"id": str(k), "image": f"{k}.png", "conversations": conv(1)})
    got = image_reliance(model, proc, records, tmp_path, batch_size=2)

    def loss(k, image):  # record k's answer loss with `image`, alone
        views = proc.images([Image.open(tmp_path / f"{image}.png").convert("RGB")])
        enc = proc.encode(records[k]["conversations"], 1, counts=views["counts"])
        with torch.no_grad():
            out = model(
                torch.tensor([enc.input_ids]),
                None,
                views["pixel_values"],
                torch.tensor([enc.labels]),
                normalizer=1.0,
                visual_index=views["visual_index"],
            )
        return float(out.loss), float(out.num_targets)

    own = [loss(k, k) for k in range(3)]
    wrong = [loss(k, (k + 1) % 3) for k in range(3)]
    n = sum(t for _, t in own)
    assert got["answer_loss"] == pytest.approx(sum(x for x, _ in own) / n, rel=1e-5)
    assert got["answer_loss_wrong_image"] == pytest.approx(sum(x for x, _ in wrong) / n, rel=1e-5)
