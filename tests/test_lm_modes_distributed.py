"""MoE-tuning and LaVIN's adapters (MMA) under DDP and FSDP, 2 gloo processes under torchrun, against one process:
the parameters a stage adds start with one process's values (the experts: the FFN's weights, sharded with their
layer), the losses (MoE balancing included) and trained weights are one process's, and the FSDP run resumes its
sharded checkpoint under torchrun and in one process, and loads with `load_run`."""

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
from safetensors.torch import load_file

from mmbridge.models.mma import ModalityAdapter, is_mma_param
from mmbridge.models.moe import balancing_loss, balancing_over, is_moe_param, moe_layers, tally
from mmbridge.runs import load_run, read_recipe
from mmbridge.train import checkpoint as ckpt
from mmbridge.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict
from tests.rounding import GRAD_REL, LOSS_REL, assert_same_outputs, assert_same_updates
from tests.test_distributed import assert_same_losses, rows, starts

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
EXPERTS = 3


def recipe_dict(tiny_lm_dir, tiny_clip_dir, world, text: Path, **top) -> dict:
    """Stage 1: LaVIN's adapters (and the bridge) train, added to the LM as built (under FSDP: on the meta device),
    on captions mixed with text-only conversations (`text`); stage 2: MoE-tuning of layer 1 (and the bridge) over
    the adapted LM, 2 micro-batches per step, balancing loss weighted 0.1. A checkpoint every step.

    The text-only samples and the 4 steps matter: LaVIN's two up-paths share one down-projection and start at zero,
    so the router and modality tokens get no gradient at step 1, and only the paths' difference after it, which
    Adam's sign-like first updates keep near zero: at step 2 their gradients are of rounding size (seen: 2e-11,
    below Adam's eps), so two runs differ there by rounding. On one modality alone the paths' gradients stay
    proportional and Adam keeps the paths equal; mixed modalities and two more steps give them real gradients, so
    the comparison relative to how far training moved them means something."""
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    records = [
        {
            "id": f"t{i}",
            "conversations": [{"from": "human", "value": f"Say the number {i}."}, {"from": "gpt", "value": str(i)}],
        }
        for i in range(20)
    ]
    text.write_text(json.dumps(records))
    data["sources"] = {"text": {"json": str(text)}}
    # no dropout: one process and two draw no masks to compare
    data["stages"][0].update(
        train={"bridge": "full", "lm": "mma"},
        lr={"bridge": 1e-2, "lm": 1e-2},
        mma={"dim": 4, "where": ["attention", "ffn"], "dropout": 0.0},
        data={"world/train/caption": 1.0, "text": 1.0},
        steps=4,
        batch_size=4,
    )
    data["stages"][1].update(
        train={"bridge": "full", "lm": "moe"},
        lr={"bridge": 1e-2, "lm": 1e-2},
        moe={"experts": EXPERTS, "top_k": 2, "layers": [1], "aux_weight": 0.1},
        steps=3,
        batch_size=4,
        grad_accum=2,
    )
    del data["stages"][1]["lora"]
    data.update(threads=1, save_every=1, keep_checkpoints=10, **top)
    return data


def test_balancing_loss_from_summed_slices_is_the_whole_micro_batchs():
    """Tallies summed over slices give the whole micro-batch's balancing loss (padding left out) on every slice,
    and the slices' gradients add up to the whole's: what the processes of a DDP/FSDP step compute."""
    torch.manual_seed(0)
    logits = torch.randn(10, 4, requires_grad=True)
    probs = logits.softmax(-1)
    chosen = probs.topk(2, dim=-1).indices
    real = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 1, 0])  # rows of two padded samples
    whole = tally(probs, chosen, real)
    want = balancing_over(whole, whole.detach())
    keep = real.bool()
    counts = torch.bincount(chosen[keep].reshape(-1), minlength=4)
    assert want.item() == pytest.approx(balancing_loss(probs[keep], counts, 2).item(), rel=1e-6)
    (want_grad,) = torch.autograd.grad(want, logits, retain_graph=True)
    halves = [tally(probs[s], chosen[s], real[s]) for s in (slice(0, 5), slice(5, 10))]
    total = sum(h.detach() for h in halves)
    per_slice = [balancing_over(h, total) for h in halves]
    for loss in per_slice:
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    (got_grad,) = torch.autograd.grad(sum(per_slice), logits)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_lm_dir, tiny_clip_dir, world) -> dict:
    """The recipe trained by one process, DDP and FSDP (concurrently), each through `train_probe.py`."""
    root = tmp_path_factory.mktemp("lm_modes")
    procs = {}
    for strategy in ("none", "ddp", "fsdp"):
        path = root / f"{strategy}.yaml"
        path.write_text(
            yaml.safe_dump(
                recipe_dict(tiny_lm_dir, tiny_clip_dir, world, root / "text.json", strategy=strategy), sort_keys=False
            )
        )  # key order is the mixture order
        launch = [sys.executable] if strategy == "none" else TORCHRUN
        log = open(root / f"{strategy}.log", "w")
        procs[strategy] = subprocess.Popen(
            [*launch, str(ROOT / "tests" / "train_probe.py"), str(path), str(root / strategy)],
            cwd=ROOT,
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    for strategy, proc in procs.items():
        if proc.wait(timeout=300) != 0:
            pytest.fail(f"{strategy} failed:\n{(root / f'{strategy}.log').read_text()[-4000:]}")
    return {"root": root, "one": root / "none", "ddp": root / "ddp", "fsdp": root / "fsdp"}


def test_added_parameters_start_as_in_one_process_and_experts_are_sharded_with_their_layer(runs, tiny_lm_dir):
    pretrained = load_file(str(Path(tiny_lm_dir) / "model.safetensors"))
    first = starts(runs["one"])
    for stage, new in ((1, is_mma_param), (2, is_moe_param)):
        want = load_file(str(runs["one"] / f"start{stage}.safetensors"))
        for strategy in ("ddp", "fsdp"):
            got = load_file(str(runs[strategy] / f"start{stage}.safetensors"))
            assert got.keys() == want.keys()
            for k in filter(new, want):  # added now: bitwise
                assert torch.equal(got[k], want[k]), (strategy, stage, k)
            # the rest: untrained until now bitwise, trained in stage 1 (adapters, bridge) up to rounding
            old = [k for k in want if not new(k)]
            assert_same_updates({k: got[k] for k in old}, {k: want[k] for k in old}, first)
    stage1, stage2 = (load_file(str(runs["fsdp"] / f"start{s}.safetensors")) for s in (1, 2))
    ups = [v for k, v in stage1.items() if "layernorm.up." in k]
    assert len(ups) == 2 * 2 * 2 * 2 and all(not v.any() for v in ups)  # layers x norms x paths x (weight, bias)
    assert stage1["lm.mma_modality.tokens.weight"].abs().sum() > 0
    experts = {k: v for k, v in stage2.items() if ".mlp.experts." in k}
    assert len(experts) == EXPERTS * 3 and "lm.model.layers.1.mlp.router.weight" in stage2
    for k, v in experts.items():  # exact copies of the FFN's weights (the LM's were frozen until now)
        ffn = k.removeprefix("lm.").replace(f".experts.{k.split('.experts.')[1].split('.')[0]}.", ".")
        assert torch.equal(v, pretrained[ffn]), k
    for rank in (0, 1):
        units = json.loads((runs["fsdp"] / f"units2_{rank}.json").read_text())
        held = units["lm.model.layers.1"]
        moe = {n for n in held if n.startswith("mlp.experts.") or n.startswith("mlp.router.")}
        assert len(moe) == EXPERTS * 3 + 1 and not any("experts" in n for n in units["lm.model.layers.0"])
        for n in moe:  # each rank holds its half of the rows
            local, full = held[n]
            assert local == ((full + 1) // 2 if rank == 0 else full // 2), (n, held[n])
        assert {"input_layernorm.down.weight", "post_attention_layernorm.norm.weight"} <= set(held)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_reproduce_one_process(runs, strategy):
    got, want = rows(runs[strategy]), rows(runs["one"])
    assert [r["stage"] for r in want] == ["align"] * 4 + ["multitask"] * 3
    assert_same_losses(got, want)
    for g, w in zip(got, want):
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=GRAD_REL) and g["tokens"] == w["tokens"]
        if w["stage"] == "multitask":  # the balancing loss over the whole micro-batch (a mean like the loss)
            assert g["loss_moe_aux"] == pytest.approx(w["loss_moe_aux"], rel=LOSS_REL)
    a = load_file(str(runs[strategy] / "model" / "model.safetensors"))
    b = load_file(str(runs["one"] / "model" / "model.safetensors"))
    assert any(".experts." in k for k in a) and any("layernorm.up." in k for k in a)
    first = starts(runs["one"])
    assert_same_updates(a, b, first)
    model, proc = load_run(runs[strategy])
    one, _ = load_run(runs["one"])
    assert len(moe_layers(model.lm)) == 1 and sum(isinstance(m, ModalityAdapter) for m in model.lm.modules()) == 4
    ids = torch.tensor(
        [
            proc.encode(
                [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}], 1
            ).input_ids
        ]
    )
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = (m.eval()(ids, pixel_values=pixels).hidden_states for m in (model, one))
        assert not one.load_state_dict(first, strict=False).unexpected_keys  # the weights before they trained
        assert_same_outputs(got, want, untrained=one(ids, pixel_values=pixels).hidden_states)


def _cut(runs, tmp_path, keep: str) -> Path:
    """A copy of the FSDP run cut back to checkpoint `keep`."""
    run = tmp_path / "run"
    shutil.copytree(runs["fsdp"], run)
    for later in ckpt.list_checkpoints(run):
        if later.name > keep:
            shutil.rmtree(later)
    return run


def test_fsdp_resumes_its_sharded_moe_checkpoint_under_torchrun(runs, tmp_path):
    """Mid MoE stage: each rank fills its shards from the pretrained files (the experts from their FFN's rows,
    the adapters' norms from theirs), then from the checkpoint's trained weights; the losses continue as one
    process's."""
    run = _cut(runs, tmp_path, "stage1-step0000001")
    proc = subprocess.run(
        [*TORCHRUN, "-m", "mmbridge", "train", str(run / "recipe.yaml"), "--out", str(run), "--resume"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage 2, step 1" in proc.stdout
    assert_same_losses(list({(r["stage"], r["step"]): r for r in rows(run)}.values()), rows(runs["one"]))


def test_fsdp_moe_checkpoint_resumes_in_one_process(runs, tmp_path):
    run = _cut(runs, tmp_path, "stage1-step0000002")
    assert sorted(p.name for p in (run / "checkpoints" / "stage1-step0000002").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    Trainer(read_recipe(run), run, resume=True, progress=False).run()
    assert_same_losses(list({(r["stage"], r["step"]): r for r in rows(run)}.values()), rows(runs["one"]))


def test_experts_without_tokens_on_a_rank_still_take_part_under_ddp_and_fsdp():
    proc = subprocess.run(
        [*TORCHRUN, str(ROOT / "tests" / "moe_ranks_probe.py")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
