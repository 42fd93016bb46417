"""LCL: sequence layout and targets, the `<soi>` state's blindness to its own image, the contrastive
loss against a hand computation, readers, export → reload; LCL through the training engine (its batch
order, SIGKILL and resume, a crash inside a checkpoint write, two gloo processes against one) and the CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmbridge.lcl.model import LCLModel, build_lm, build_tokenizer
from mmbridge.lcl.sequence import (
    IGNORE,
    Document,
    ImageCache,
    ImageRef,
    SequenceConfig,
    SpecialIds,
    build_sequence,
    collate,
    select_images,
)
from mmbridge.models.vit import LCLVisionTower, ViTConfig
from mmbridge.objectives.lcl import LatentCompression
from tests.rounding import GRAD_REL, LOSS_REL

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a red circle .", "a blue square and a green triangle .", "shapes come in many colours ."]
LM = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 64,
}
VIT = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2}


def tiny_model(texts=TEXTS, seed=0):
    tok = build_tokenizer("words", texts)
    torch.manual_seed(seed)
    lm = build_lm(LM, tok)
    model = LCLModel(LCLVisionTower(ViTConfig(**VIT, out_dim=32)), lm, SpecialIds.of(tok))
    return model, tok


def objective_and_loss(model, batch, **kw):
    """The lcl objective on one batch, normalised by its own text targets (a one-micro-batch step)."""
    obj = LatentCompression(model, **kw)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    return obj, obj(model, batch, normalizer=n)


def encoder(tok):
    return lambda s: tok(s, add_special_tokens=False)["input_ids"]


def pixels(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(32, 32, 3, generator=g).mul(255).byte().numpy() for _ in range(n)]


def images_of(arrays):
    from PIL import Image

    return [Image.fromarray(a) for a in arrays]


def make_batch(model, tok, docs, cfg, seed=0):
    samples = [
        build_sequence(d, cfg, model.ids, model.n_patches, encoder(tok), np.random.default_rng([seed, i]))
        for i, d in enumerate(docs)
    ]
    c = model.vit.config
    return collate(samples, model.ids.pad, ImageCache(c.image_size, c.image_mean, c.image_std))


# ------------------------------------------------------------------------------------------------ layout
def test_layout_and_targets_exact():
    model, tok = tiny_model()
    ids, enc = model.ids, encoder(tok)
    doc = Document(TEXTS, [ImageRef("img0", 0, 0.3), ImageRef("img2", 2, 0.25)])
    s = build_sequence(doc, SequenceConfig(image_position="after"), ids, 16, enc, np.random.default_rng(0))
    span = [ids.soi] + [ids.patch] * 16 + [ids.eoi]
    t0, t1, t2 = enc(TEXTS[0]), enc(" " + TEXTS[1]), enc(" " + TEXTS[2])
    assert s["input_ids"] == t0 + span + t1 + t2 + span
    assert s["labels"] == t0 + [IGNORE] * 18 + t1 + t2 + [IGNORE] * 18
    assert s["images"] == ["img0", "img2"]
    s = build_sequence(doc, SequenceConfig(image_position="before"), ids, 16, enc, np.random.default_rng(0))
    assert s["input_ids"] == span + enc(TEXTS[0]) + t1 + span + t2
    # random: each image before or after its sentence with p = 0.5
    firsts = [
        build_sequence(
            Document(TEXTS[:1], [ImageRef("i", 0)]), SequenceConfig(), ids, 16, enc, np.random.default_rng(k)
        )["input_ids"][0]
        == ids.soi
        for k in range(400)
    ]
    assert 0.43 < np.mean(firsts) < 0.57


def test_selection_threshold_one_per_sentence_and_cap():
    texts = [f"s{i}" for i in range(9)]
    doc = Document(
        texts,
        [ImageRef("low", 0, 0.1), ImageRef("a", 1, 0.3), ImageRef("b", 1, 0.5)]
        + [ImageRef(f"x{i}", i, 0.2 + i / 100) for i in range(2, 9)],
    )
    chosen = select_images(doc, SequenceConfig(min_sim=0.2, max_images=6))
    assert len(chosen) == 6 and 0 not in chosen and chosen[1].source == "b"
    assert [im.source for im in chosen.values()] == ["b", "x4", "x5", "x6", "x7", "x8"]  # best six, in order


def test_truncation_never_cuts_an_image_and_collate_pads_without_targets():
    model, tok = tiny_model()
    ids, enc = model.ids, encoder(tok)
    doc = Document(TEXTS, [ImageRef("img0", 0), ImageRef("img1", 1)])
    n0 = len(enc(TEXTS[0]))
    for max_length in range(1, 60):
        cfg = SequenceConfig(image_position="after", max_length=max_length)
        s = build_sequence(doc, cfg, ids, 16, enc, np.random.default_rng(0))
        x = s["input_ids"]
        assert len(x) <= max_length
        assert x.count(ids.patch) == 16 * len(s["images"]) == 16 * x.count(ids.soi) == 16 * x.count(ids.eoi)
        if max_length < n0 + 18:
            assert s["images"] == []
    batch = make_batch(
        model,
        tok,
        [Document(TEXTS[:1], [ImageRef(images_of(pixels(1))[0], 0)]), Document(TEXTS, [])],
        SequenceConfig(image_position="after"),
    )
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == IGNORE).all()
    special = torch.isin(batch["input_ids"], torch.tensor([ids.soi, ids.eoi, ids.patch]))
    assert (batch["labels"][special] == IGNORE).all() and (batch["labels"][~special & ~pad] >= 0).all()
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------------------ model
def two_image_batch(model, tok, arrays):
    doc = Document(TEXTS, [ImageRef(im, i) for i, im in enumerate(images_of(arrays))])
    return make_batch(model, tok, [doc], SequenceConfig(image_position="after"))


def test_soi_state_sees_no_token_of_its_own_image():
    model, tok = tiny_model()
    arrays = pixels(2)
    b = two_image_batch(model, tok, arrays)
    ids = b["input_ids"][0]
    soi = (ids == model.ids.soi).nonzero().flatten()
    eoi = (ids == model.ids.eoi).nonzero().flatten()
    with torch.no_grad():
        h, _ = model.hidden(b["input_ids"], b["attention_mask"], b["pixel_values"])
        changed = [a.copy() for a in arrays]
        changed[1] = 255 - changed[1]  # perturb the second image only
        b2 = two_image_batch(model, tok, changed)
        h2, _ = model.hidden(b2["input_ids"], b2["attention_mask"], b2["pixel_values"])
    assert torch.equal(h[0, : soi[1] + 1], h2[0, : soi[1] + 1])  # up to and including its <soi>: unchanged
    assert not torch.allclose(h[0, eoi[1]], h2[0, eoi[1]])
    changed = [255 - arrays[0], arrays[1]]  # the first image is context for the second <soi>
    with torch.no_grad():
        b3 = two_image_batch(model, tok, changed)
        h3, _ = model.hidden(b3["input_ids"], b3["attention_mask"], b3["pixel_values"])
    assert not torch.allclose(h[0, soi[1]], h3[0, soi[1]])


def test_generation_loss_is_text_only_and_reaches_the_vit():
    model, tok = tiny_model()
    b = two_image_batch(model, tok, pixels(2))
    obj, out = objective_and_loss(model, b, lambda_con=0.0)
    h, _ = model.hidden(b["input_ids"], b["attention_mask"], b["pixel_values"])
    logits = model.lm.get_output_embeddings()(h[0, :-1])
    labels = b["labels"][0, 1:]
    manual = [F.cross_entropy(logits[t], labels[t]) for t in range(len(labels)) if labels[t] != IGNORE]
    # every text token but the first (nothing predicts it); none of <soi>, patches, <eoi>
    assert int((labels != IGNORE).sum()) == len(manual) == len(tok(" ".join(TEXTS))["input_ids"]) - 1
    assert math.isclose(float(out.terms["gen"]), float(torch.stack(manual).mean().detach()), rel_tol=1e-5)
    out.loss.backward()
    assert model.vit.patch_embed.weight.grad.abs().sum() > 0  # through the patch tokens
    assert model.vit.pool.query.grad is None and obj.head.proj.weight.grad is None


def test_contrastive_loss_matches_hand_computation_and_skips_position_zero():
    model, tok = tiny_model()
    head = LatentCompression(model).head
    torch.manual_seed(1)
    latent, state = torch.randn(4, 32), torch.randn(4, 32)
    valid = torch.tensor([True, False, True, True])
    got = head(latent, state, valid)
    img = latent.numpy()[[0, 2, 3]]
    txt = (state @ head.proj.weight.T).detach().numpy()[[0, 2, 3]]
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    s = img @ txt.T / 0.07
    i2t = -np.mean([s[i, i] - np.log(np.exp(s[i]).sum()) for i in range(3)])
    t2i = -np.mean([s[i, i] - np.log(np.exp(s[:, i]).sum()) for i in range(3)])
    assert abs(got.item() - (i2t + t2i) / 2) < 1e-5
    head.log_scale.data.fill_(math.log(500.0))
    assert head.scale.item() == 100.0  # clamped
    # image-first pairs: every <soi> is at position 0, no context → no contrastive term
    docs = [Document([t], [ImageRef(im, 0)]) for t, im in zip(TEXTS, images_of(pixels(3)))]
    b = make_batch(model, tok, docs, SequenceConfig(image_position="before"))
    assert not model.soi_states(b["input_ids"], torch.zeros(*b["input_ids"].shape, 1))[1].any()
    assert float(objective_and_loss(model, b)[1].terms["con"]) == 0.0
    b = make_batch(model, tok, docs, SequenceConfig(image_position="after"))
    assert int(model.soi_states(b["input_ids"], torch.zeros(*b["input_ids"].shape, 1))[1].sum()) == 3
    assert float(objective_and_loss(model, b)[1].terms["con"]) > 0


# ------------------------------------------------------------------------------------ readers and export
def test_jsonl_and_shards_give_the_same_documents(world, tmp_path):
    from mmbridge.lcl.readers import iter_shards, read_jsonl, write_shards

    jsonl = world["manifest"]["train"]["interleaved"]
    docs = read_jsonl(jsonl, world["images"])
    shards = write_shards(jsonl, world["images"], tmp_path / "shards", per_shard=5)
    assert len(shards) == math.ceil(len(docs) / 5)
    streamed = list(iter_shards(shards))
    assert [d.texts for d in streamed] == [d.texts for d in docs]
    cache = ImageCache(32, (0.5,) * 3, (0.5,) * 3)
    a = cache([im.source for im in docs[0].images])
    b = cache([im.source for im in streamed[0].images])
    assert torch.equal(a, b) and [im.sim for im in docs[0].images] == [im.sim for im in streamed[0].images]


def test_export_reload_identical_features_and_registry(tmp_path):
    from mmbridge.models.vision import build_vision_encoder

    torch.manual_seed(0)
    tower = LCLVisionTower(ViTConfig(**VIT, out_dim=24))
    tower.save_pretrained(tmp_path / "enc")
    again = LCLVisionTower.from_pretrained(tmp_path / "enc")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        (l1, t1), (l2, t2) = tower(x), again(x)
        enc = build_vision_encoder({"name": "lcl_vit", "path": str(tmp_path / "enc"), "features": "tokens"})
        assert torch.equal(l1, l2) and torch.equal(t1, t2) and torch.equal(enc(x), t1)
        enc = build_vision_encoder({"name": "lcl_vit", "path": str(tmp_path / "enc")})
        assert torch.equal(enc(x), tower.patch_features(x)) and enc.grid == (4, 4) and enc.hidden_size == 32


# ------------------------------------------------------------------------------------ through the engine
def lcl_recipe_dict(world_root, steps=3, **top):
    return {
        "kind": "lcl",
        "name": "tiny-lcl",
        "world": {"root": world_root, "n_train": 40, "n_val": 8, "n_test": 8, "seed": 0, "image_size": 32},
        "model": {"vision": VIT, "lm": {"tokenizer": "words", **LM}, "max_length": 128},
        "stages": [
            {
                "name": "lcl",
                "data": {"world/train/interleaved": 1.0},
                "objective": {"name": "lcl", "lambda_con": 0.1},
                "train": {"vision": "full", "lm": "full"},
                "lr": {"vision": 1e-3, "lm": 1e-3, "objective": 1e-3},
                "steps": steps,
                "batch_size": 4,
                "weight_decay": 0.05,
                "betas": [0.9, 0.98],
                "eps": 1e-6,
            }
        ],
        "threads": 1,
        "save_every": 2,
        **top,
    }


def rows_of(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_exports_and_an_lmm_loads_the_encoder(world, tmp_path, tiny_lm_dir):
    import yaml

    from mmbridge.cli import main
    from mmbridge.config import RecipeError, recipe_from_dict

    path = tmp_path / "lcl.yaml"
    path.write_text(yaml.safe_dump(lcl_recipe_dict(world["root"])))
    main(["train", str(path), "--out", str(tmp_path / "run")])
    rows = rows_of(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss_gen"] > 0 and r["loss_con"] > 0 and r["flops"] > 0 for r in rows)
    assert all(r["loss"] == pytest.approx(r["loss_gen"] + 0.1 * r["loss_con"], rel=1e-5) for r in rows)
    assert math.isclose(rows[0]["logit_scale"], 1 / 0.07, rel_tol=1e-3)
    enc = tmp_path / "run" / "encoder"
    assert (enc / "config.json").exists() and (enc / "model.safetensors").exists()
    with pytest.raises(RecipeError, match="sequence"):
        recipe_from_dict({**lcl_recipe_dict(world["root"]), "sequence": {"max_len": 3}})
    bad = lcl_recipe_dict(world["root"])
    bad["stages"][0]["objective"] = {"name": "lm"}
    with pytest.raises(RecipeError, match="objective.name"):
        recipe_from_dict(bad)
    # an LMM with the exported encoder: its 4x4 grid of patch features reaches the LM, loss on the answer
    from mmbridge.config import ModelConfig
    from mmbridge.models.build import build_model

    torch.manual_seed(0)
    lmm, proc = build_model(
        ModelConfig(
            vision={"name": "lcl_vit", "path": str(enc)},
            bridge={"name": "mlp"},
            lm={"path": tiny_lm_dir},
            max_length=128,
            system_prompt="",
        )
    )
    assert lmm.vision.cfg["path"] == str(enc) and lmm.num_image_tokens == 16
    e = proc.encode([{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}], 1)
    out = lmm(torch.tensor([e.input_ids]), pixel_values=torch.randn(1, 3, 32, 32), labels=torch.tensor([e.labels]))
    out.loss.backward()
    assert out.loss > 0 and lmm.vision.tower.patch_embed.weight.grad.abs().sum() > 0


def test_engine_batches_follow_the_seeded_epoch_order(world):
    """Micro-batch k holds global positions [kB, (k+1)B) of a per-epoch permutation, each document laid out
    with the rng of (seed, epoch, index): resumable at any micro-batch and the same under any process count."""
    from mmbridge.config import recipe_from_dict
    from mmbridge.lcl.data import EpochBatches
    from mmbridge.train.distributed import Dist
    from mmbridge.train.tasks import spec_for

    batches = iter(EpochBatches(10, 4, seed=3))
    got = [next(batches) for _ in range(5)]  # 20 items: two epochs
    perm = [np.random.default_rng([3, e]).permutation(10) for e in (0, 1)]
    assert [i for b in got for i in b] == [e * 10 + int(j) for e in (0, 1) for j in perm[e]]
    assert next(iter(EpochBatches(10, 4, seed=3, start=3))) == got[3]
    task = spec_for(recipe_from_dict(lcl_recipe_dict(world["root"]))).task
    model, tok = task.build()
    loader, n = task.loader(model, task.recipe.stages[0], 2, Dist())
    first = next(iter(loader))
    docs = task.sources["world/train/interleaved"]
    assert n == len(docs)
    perm0 = np.random.default_rng([0, 0]).permutation(n)
    want = [
        build_sequence(
            docs[int(i)], task.sequence, model.ids, model.n_patches, encoder(tok), np.random.default_rng([0, 0, int(i)])
        )["input_ids"]
        for i in perm0[8:12]
    ]
    assert [row[: len(w)].tolist() for row, w in zip(first["input_ids"], want)] == want


@pytest.mark.parametrize("seed", [0])  # 0: killed as step 5's checkpoint syncs its first file (resumes at 4)
def test_sigkill_at_a_seeded_point_then_resume_reproduces_the_losses(world, tmp_path, seed):
    import random
    import signal
    import subprocess
    import sys

    import yaml

    from mmbridge.config import recipe_from_dict
    from mmbridge.train import checkpoint as ckpt
    from mmbridge.train.trainer import Trainer
    from tests.signalled_run import counted_syncs, start_signalled

    data = lcl_recipe_dict(world["root"], steps=8, save_every=1)
    path = tmp_path / "lcl.yaml"
    path.write_text(yaml.safe_dump(data))
    with counted_syncs(tmp_path / "ref") as syncs:
        Trainer(recipe_from_dict(data), tmp_path / "ref", progress=False).run()
    reference = rows_of(tmp_path / "ref")
    # a file sync before the last step's row: between a checkpoint's files, before its manifest, after a rename
    kill_at = random.Random(seed).choice([i + 1 for i, (_, rows) in enumerate(syncs) if rows < len(reference)])
    run = tmp_path / "run"
    proc = start_signalled(path, run, log=tmp_path / "train.log", SIGNAL="SIGKILL", AT_SYNC=str(kill_at))
    assert proc.wait(timeout=240) == -signal.SIGKILL, (tmp_path / "train.log").read_text()
    assert (run / "metrics.jsonl").read_text().count("\n") == syncs[kill_at - 1][1] < len(reference)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "resume.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmbridge", "train", str(path), "--out", str(run), "--resume"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    assert proc.wait(timeout=240) == 0, (tmp_path / "resume.log").read_text()
    said = (tmp_path / "resume.log").read_text()
    assert "resuming from" in said or "no usable checkpoint" in said, said
    got = rows_of(run)
    assert [r["step"] for r in got] == [r["step"] for r in reference]
    for g, w in zip(got, reference):
        assert abs(g["loss"] - w["loss"]) <= 1e-6 and abs(g["loss_con"] - w["loss_con"]) <= 1e-6, (g, w)
    assert not list((run / "checkpoints").glob(".*")) and len(ckpt.list_checkpoints(run)) == 2
    assert (run / "encoder" / "model.safetensors").exists()


def test_a_crash_inside_a_checkpoint_write_leaves_the_previous_one_usable(world, tmp_path, monkeypatch):
    from mmbridge.config import recipe_from_dict
    from mmbridge.train.trainer import Trainer

    recipe = recipe_from_dict(lcl_recipe_dict(world["root"], steps=5, save_every=1))
    Trainer(recipe, tmp_path / "ref", progress=False).run()
    real, calls = torch.save, {"n": 0}

    class Crash(Exception):
        pass

    def save(obj, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # inside checkpoint 3: a half-written file, no manifest
            Path(path).write_bytes(b"PK\x03\x04 half a zip")
            raise Crash
        return real(obj, path, *a, **kw)

    run = tmp_path / "run"
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(Crash):
        Trainer(recipe, run, progress=False).run()
    monkeypatch.setattr(torch, "save", real)
    assert [p.is_dir() for p in (run / "checkpoints").glob(".stage0-step0000003.*.tmp")] == [True]
    assert (run / "checkpoints" / "stage0-step0000002").is_dir()
    Trainer(recipe, run, resume=True, progress=False).run()
    got, want = rows_of(run), rows_of(tmp_path / "ref")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert all(abs(g["loss"] - w["loss"]) <= 1e-6 for g, w in zip(got, want))


def test_two_gloo_processes_give_one_process_losses(world, tmp_path):
    import subprocess
    import sys

    import yaml

    from mmbridge.config import recipe_from_dict
    from mmbridge.train.trainer import Trainer

    data = lcl_recipe_dict(world["root"], steps=3, save_every=0)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump({**data, "strategy": "ddp"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "ddp.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "mmbridge",
            "train",
            str(path),
            "--out",
            str(tmp_path / "ddp"),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    Trainer(recipe_from_dict(data), tmp_path / "one", progress=False).run()
    assert proc.wait(timeout=300) == 0, (tmp_path / "ddp.log").read_text()[-4000:]
    got, want = rows_of(tmp_path / "ddp"), rows_of(tmp_path / "one")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3]
    for g, w in zip(got, want):
        for key, rel in (("loss", LOSS_REL), ("loss_gen", LOSS_REL), ("loss_con", LOSS_REL), ("grad_norm", GRAD_REL)):
            assert g[key] == pytest.approx(w[key], rel=rel), (key, g, w)  # rounding's bounds (tests/rounding.py)
        assert g["tokens"] == w["tokens"] and g["flops"] == w["flops"]
