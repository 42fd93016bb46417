"""Scale out: DDP and FSDP on 2 CPU processes (gloo, under torchrun) reproduce one process on the same
global batch; a 2-process sharded checkpoint resumes in one process and in two FSDP processes; MFU's FLOP count
by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from mmbridge.runs import load_run, read_recipe
from mmbridge.train import checkpoint as ckpt
from mmbridge.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict
from tests.rounding import GRAD_REL, LOSS_REL, assert_same_outputs, assert_same_updates

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def recipe_dict(tiny_lm_dir, tiny_clip_dir, world, **top) -> dict:
    """Stage 1: bridge, 2 micro-batches per step; stage 2: bridge + LoRA. A checkpoint every step."""
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["stages"][0].update(steps=3, batch_size=4, grad_accum=2)
    data["stages"][1].update(steps=3, batch_size=4)
    data.update(threads=1, save_every=1, keep_checkpoints=10, **top)
    return data


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(got: list[dict], want: list[dict], rel: float = LOSS_REL) -> None:
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in want]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=rel), (g["stage"], g["step"])


def starts(run_dir: Path) -> dict[str, torch.Tensor]:
    """Each trained tensor's value when it first trained, from `train_probe.py`'s `start<stage>` files."""
    out = {}
    for path in sorted(run_dir.glob("start*.safetensors")):  # stage order (fewer than 10 stages)
        with safe_open(str(path), "pt") as f:
            for name in json.loads(f.metadata()["trained"]):
                out.setdefault(name, f.get_tensor(name))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_lm_dir, tiny_clip_dir, world) -> dict:
    """The same recipe trained by DDP and FSDP on 2 processes (`mmbridge train` under torchrun) and by one process
    (through `train_probe.py`, which also records each trained tensor's starting value), concurrently."""
    root = tmp_path_factory.mktemp("dist")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    procs = {}
    for strategy in ("none", "ddp", "fsdp"):
        path = root / f"{strategy}.yaml"
        path.write_text(
            yaml.safe_dump(recipe_dict(tiny_lm_dir, tiny_clip_dir, world, strategy=strategy), sort_keys=False)
        )  # key order is the mixture order
        out = root / ("one" if strategy == "none" else strategy)
        command = (
            [sys.executable, str(ROOT / "tests" / "train_probe.py"), str(path), str(out)]
            if strategy == "none"
            else [*torchrun, "-m", "mmbridge", "train", str(path), "--out", str(out)]
        )
        log = open(root / f"{strategy}.log", "w")
        procs[strategy] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    for strategy, proc in procs.items():
        if proc.wait(timeout=300) != 0:
            pytest.fail(f"{strategy} failed:\n{(root / f'{strategy}.log').read_text()[-4000:]}")
    return {"root": root, "one": root / "one", "ddp": root / "ddp", "fsdp": root / "fsdp"}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_reproduce_one_process(runs, strategy):
    got, want = rows(runs[strategy]), rows(runs["one"])
    assert len(want) == 6
    assert_same_losses(got, want)
    for g, w in zip(got, want):
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=GRAD_REL)
        assert g["tokens"] == w["tokens"] and g["flops"] == w["flops"]  # summed over both ranks
        assert 0 < g["mfu"] < 1
    # the consolidated export is what one process would have written
    a = load_file(str(runs[strategy] / "model" / "model.safetensors"))
    b = load_file(str(runs["one"] / "model" / "model.safetensors"))
    assert any("lora_B" in k for k in a)
    first = starts(runs["one"])
    assert_same_updates(a, b, first)
    model, proc = load_run(runs[strategy])  # and loads as any run does: the one process's model
    one, _ = load_run(runs["one"])
    ids = torch.tensor(
        [
            proc.encode(
                [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}], 1
            ).input_ids
        ]
    )
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = (m(ids, pixel_values=pixels).hidden_states for m in (model, one))
        assert not one.load_state_dict(first, strict=False).unexpected_keys  # the weights before they trained
        assert_same_outputs(got, want, untrained=one(ids, pixel_values=pixels).hidden_states)


@pytest.mark.parametrize("strategy, keep", [("fsdp", "stage1-step0000001"), ("ddp", "stage0-step0000002")])
def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path, strategy, keep):
    """Cut a 2-process run back to a mid-stage sharded checkpoint; one process continues the same losses."""
    run = tmp_path / "run"
    shutil.copytree(runs[strategy], run)
    folder = run / "checkpoints" / keep
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    for later in ckpt.list_checkpoints(run):
        if later.name > keep:
            shutil.rmtree(later)
    recipe = read_recipe(run)
    assert recipe.strategy == strategy  # no torchrun here: one process
    Trainer(recipe, run, resume=True, progress=False).run()
    resumed = list({(r["stage"], r["step"]): r for r in rows(run)}.values())
    assert_same_losses(resumed, rows(runs["one"]))


def test_fsdp_resumes_its_sharded_checkpoint_under_torchrun(runs, tmp_path):
    """Two FSDP processes continue from a mid-stage sharded checkpoint (LoRA stage): each rank fills its shards
    from the pretrained files, then from the checkpoint's trained weights; the losses continue as one process's."""
    run = tmp_path / "run"
    shutil.copytree(runs["fsdp"], run)
    for later in ckpt.list_checkpoints(run):
        if later.name > "stage1-step0000001":
            shutil.rmtree(later)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
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
            str(run / "recipe.yaml"),
            "--out",
            str(run),
            "--resume",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "stage 2, step 1" in proc.stdout
    resumed = list({(r["stage"], r["step"]): r for r in rows(run)}.values())
    assert_same_losses(resumed, rows(runs["one"]))


# -- FLOPs ------------------------------------------------------------------------------------------
def test_step_flops_match_a_hand_count(tiny_recipe):
    from mmbridge.models.build import build_model
    from mmbridge.train.flops import StepFlops
    from mmbridge.train.parts import apply_stage_modes

    model, _ = build_model(tiny_recipe.model)
    vocab = model.lm.config.vocab_size
    lengths, targets = [10, 7], [3, 2]
    batch = {
        "input_ids": torch.zeros(2, 10, dtype=torch.long),
        "attention_mask": torch.zeros(2, 10, dtype=torch.long),
        "labels": torch.full((2, 10), -100),
        "pixel_values": torch.zeros(2, 3, 32, 32),
    }
    for r, (n, t) in enumerate(zip(lengths, targets)):
        batch["attention_mask"][r, :n] = 1
        batch["labels"][r, n - t : n] = 1
    # tiny Llama: width 64, MLP 128, 2 layers, 4 heads x 16, 2 KV heads; MACs per token per layer
    lm_macs = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128
    attention = 2 * (2 * 64 + 2 * 64)  # per (query, key) pair: 2 layers x (QK^T + AV over 4 heads x 16)
    # tiny CLIP at 32 px: 16 patches of 8x8x3 -> 32, then 2 layers over 17 tokens (both run)
    clip = 2 * 16 * 192 * 32 + 2 * (17 * 2 * (4 * 32 * 32 + 2 * 32 * 64) + 2 * 2 * 17 * 17 * 32)
    bridge = 2 * 4 * (32 * 64 + 64 * 64)  # pool to 2x2 tokens, then Linear(32, 64), Linear(64, 64)
    n_tok, n_sq = sum(lengths), sum(n * n for n in lengths)

    apply_stage_modes(model, tiny_recipe.stages[0])  # bridge trains; LM and vision frozen
    want = (
        n_tok * 2 * 2 * lm_macs * 2
        + n_sq * attention * 3
        + sum(targets) * 2 * 64 * vocab * 2
        + 2 * (clip * 1 + bridge * 3)
    )
    assert StepFlops(model)(batch) == want

    apply_stage_modes(model, tiny_recipe.stages[1])  # + LoRA r=4 on q_proj, v_proj: adapters train (x3)
    lora_macs = (64 * 4 + 4 * 64) + (64 * 4 + 4 * 32)
    want_lora = want + n_tok * 2 * 2 * lora_macs * 3
    assert StepFlops(model)(batch) == want_lora

    # LoRA in the top layer only, the bridge frozen: layer 0 runs forward only (nothing below it trains)
    import dataclasses

    model, _ = build_model(tiny_recipe.model)
    lora = tiny_recipe.stages[1]
    apply_stage_modes(
        model,
        dataclasses.replace(
            lora,
            train={"vision": "frozen", "bridge": "frozen", "lm": "lora"},
            lora=dataclasses.replace(lora.lora, layers=1),
        ),
    )
    want_top = (
        n_tok * 2 * lm_macs * (1 + 2)
        + n_tok * 2 * lora_macs * 3
        + n_sq * attention // 2 * (1 + 3)
        + sum(targets) * 2 * 64 * vocab * 2
        + 2 * (clip + bridge)
    )
    assert StepFlops(model)(batch) == want_top


def test_packed_rows_count_attention_per_sample():
    from mmbridge.train.flops import segment_lengths

    batch = {
        "input_ids": torch.zeros(2, 6, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]]),
    }
    assert segment_lengths(batch) == [3, 2, 2, 4]
    del batch["position_ids"]
    assert segment_lengths(batch) == [5, 6]


# -- DDP's search for unused parameters ------------------------------------------------------------------------
def test_ddp_searches_for_unused_parameters_only_where_a_stage_can_leave_some():
    """Only the LM trained alone under the next-token loss runs every trained parameter on every batch; a trained
    bridge (skipped by a text-only batch) or another objective (lexical never runs the LM) needs DDP's search."""
    from torch import nn

    from mmbridge.objectives.base import Objective
    from mmbridge.objectives.captioning import NextTokenLoss
    from mmbridge.train.distributed import TrainStep, may_leave_unused

    class BridgeOnly(Objective):
        def forward(self, model, batch, normalizer):
            return model.bridge(batch["x"]).sum()

    model = nn.Module()
    model.lm, model.bridge, model.vision = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    model.requires_grad_(False).lm.requires_grad_(True)
    assert not may_leave_unused(TrainStep(model, NextTokenLoss(model)))
    assert may_leave_unused(TrainStep(model, BridgeOnly(model)))
    for part in ("bridge", "vision"):
        model.requires_grad_(False).get_submodule(part).requires_grad_(True)
        assert may_leave_unused(TrainStep(model, NextTokenLoss(model))), part


def test_ddp_without_the_search_trains_an_lm_only_stage_as_one_process(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    """A stage that trains LoRA in the LM alone under `lm` runs DDP without `find_unused_parameters`: had the forward
    left a trained parameter out, DDP would stop at the second step; the losses are one process's."""
    data = recipe_dict(tiny_lm_dir, tiny_clip_dir, world)
    data["save_every"] = 0
    stage = data["stages"][1]
    stage.update(train={"lm": "lora"}, lr={"lm": 1e-2}, steps=3, batch_size=4)
    data["stages"] = [stage]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = {}
    for strategy in ("none", "ddp"):
        path = tmp_path / f"{strategy}.yaml"
        path.write_text(yaml.safe_dump({**data, "strategy": strategy}, sort_keys=False))
        launch = [sys.executable] if strategy == "none" else TORCHRUN
        out[strategy] = tmp_path / strategy
        proc = subprocess.run(
            [*launch, "-m", "mmbridge", "train", str(path), "--out", str(out[strategy])],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, want = rows(out["ddp"]), rows(out["none"])
    assert len(want) == 3
    assert_same_losses(got, want)
