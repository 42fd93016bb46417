"""Staged training: what trains per stage, checkpoints, resume, recipe errors."""

from __future__ import annotations

import json

import pytest
import torch

from mmbridge.config import RecipeError, load_recipe, recipe_from_dict
from mmbridge.runs import load_run
from mmbridge.train.trainer import Trainer
from tests.conftest import interrupted_run, tiny_recipe_dict
from tests.rounding import GRAD_REL, LOSS_REL


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    """Keys of `before` whose values differ now (LoRA's wrapping renames w → base_layer.w)."""
    after = {k.replace(".base_layer", ""): v for k, v in module.state_dict().items()}
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_each_stage_trains_exactly_its_parts(tiny_recipe, tmp_path):
    trainer = Trainer(tiny_recipe, tmp_path / "run", progress=False)
    m = trainer.model
    v0, b0, l0 = snapshot(m.vision), snapshot(m.bridge), snapshot(m.lm)
    trainer.train_stage(0, tiny_recipe.stages[0])  # bridge only
    assert changed(v0, m.vision) == set() and changed(l0, m.lm) == set()
    assert changed(b0, m.bridge) == set(b0)
    b1, l1 = snapshot(m.bridge), snapshot(m.lm)
    trainer.train_stage(1, tiny_recipe.stages[1])  # bridge + LoRA
    lm_changed = changed(l1, m.lm)  # the snapshot predates LoRA, so this compares the base weights
    assert lm_changed == set(), f"frozen base LM weights changed: {sorted(lm_changed)[:3]}"
    lora = {n: p for n, p in m.lm.named_parameters() if "lora_B" in n}
    assert lora and all(p.abs().sum() > 0 for p in lora.values())  # lora_B starts at zero, so it trained
    assert changed(b1, m.bridge) == set(b1) and changed(v0, m.vision) == set()


def test_saved_run_reloads_to_identical_logits(tiny_recipe, tmp_path):
    trainer = Trainer(tiny_recipe, tmp_path / "run", progress=False)
    trainer.run()
    model, proc = trainer.model.eval(), trainer.processor
    conv = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]
    enc = proc.encode(conv, 1)
    ids, pixels = torch.tensor([enc.input_ids]), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(ids, pixel_values=pixels).hidden_states
        loaded, proc2 = load_run(tmp_path / "run")
        got = loaded(ids, pixel_values=pixels).hidden_states
    assert torch.equal(want, got)
    assert proc2.encode(conv, 1).input_ids == enc.input_ids
    assert (tmp_path / "run" / "loss_1_align.png").stat().st_size > 1000
    assert (tmp_path / "run" / "loss_2_multitask.png").exists()


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows]


def test_resume_continues_the_same_loss_sequence(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["save_every"] = 2
    for st in data["stages"]:
        st["steps"] = 5
    recipe = recipe_from_dict(data)
    Trainer(recipe, tmp_path / "a", progress=False).run()
    reference = losses(tmp_path / "a")

    interrupted_run(recipe, tmp_path / "b", 9)  # during stage 2, step 4 (the last checkpoint is stage 2 step 2)
    Trainer(recipe, tmp_path / "b", resume=True, progress=False).run()
    resumed = losses(tmp_path / "b")
    # the interrupted run logged stage-2 step 3 twice (before the crash and after resuming)
    dedup = list({(s, k): (s, k, v) for s, k, v in resumed}.values())
    assert [x[:2] for x in dedup] == [x[:2] for x in reference]
    for (s, k, got), (_, _, want) in zip(dedup, reference):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (s, k)


def test_unknown_recipe_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - name: s\n    data: {a: 1}\n    trian: {bridge: full}\n")
    with pytest.raises(RecipeError, match=r"stages\[0\]\.trian: unknown key"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match=r"recipe\.modle: unknown key"):
        recipe_from_dict({"modle": {}})


def test_recipe_overrides_and_type_errors(tmp_path):
    r = load_recipe("objects", ["stages.1.steps=7", "model.bridge.objects=2"])
    assert r.stages[1].steps == 7 and r.model.bridge["objects"] == 2
    with pytest.raises(RecipeError, match=r"steps: expected int"):
        load_recipe("demo", ["stages.0.steps=many"])
    with pytest.raises(RecipeError, match=r"lr\.lm: missing learning rate"):
        load_recipe("demo", ["stages.1.lr={bridge: 0.1}"])


def test_grad_accumulation_normalises_by_all_target_tokens(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    """batch 4 in one step == 2 micro-batches of 2: same loss and gradient norm at step 1."""
    logs = []
    for bs, accum in ((4, 1), (2, 2)):
        data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
        data["stages"] = data["stages"][:1]
        data["stages"][0].update(steps=1, batch_size=bs, grad_accum=accum, clip=1e9)
        run = tmp_path / f"bs{bs}"
        Trainer(recipe_from_dict(data), run, progress=False).run()
        logs.append(json.loads((run / "metrics.jsonl").read_text().splitlines()[0]))
    (a, b) = logs
    assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_REL)  # the same sums, split otherwise
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=GRAD_REL)
