"""A run survives its faults: SIGKILL and resume, SIGTERM/SIGINT, corrupt checkpoints, a malicious
pickle, non-finite losses and gradients, an unwritable or full disk."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmbridge.config import recipe_from_dict, recipe_to_dict
from mmbridge.objectives.base import OBJECTIVES, LossOutput
from mmbridge.objectives.captioning import NextTokenLoss
from mmbridge.train import checkpoint as ckpt
from mmbridge.train.trainer import NonFiniteError, Trainer
from tests.conftest import Interrupt, interrupted_run, tiny_recipe_dict
from tests.signalled_run import counted_syncs, start_signalled

ROOT = Path(__file__).resolve().parents[1]


def recipe_dict(tiny_lm_dir, tiny_clip_dir, world, steps=(5, 5), **top) -> dict:
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    for st, n in zip(data["stages"], steps):
        st["steps"] = n
    data["stages"] = data["stages"][: len(steps)]
    data.update({"save_every": 1, "threads": 1, **top})
    return data


def losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows]


def assert_same_losses(got: list[tuple], want: list[tuple]) -> None:
    assert [g[:2] for g in got] == [w[:2] for w in want]
    for g, w in zip(got, want):
        assert abs(g[2] - w[2]) <= 1e-6, (g, w)


# -- real processes: SIGKILL and SIGTERM ------------------------------------------------------
def start_train(recipe_yaml: Path, run_dir: Path, *extra: str, tag: str = "train") -> subprocess.Popen:
    """`python -m mmbridge train` as a child process; its output goes to RUN/../<tag>.log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = open(run_dir.parent / f"{tag}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "mmbridge", "train", str(recipe_yaml), "--out", str(run_dir), *extra],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def output(run_dir: Path, tag: str = "train") -> str:
    return (run_dir.parent / f"{tag}.log").read_text()


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory, tiny_lm_dir, tiny_clip_dir, world):
    """A recipe file (5 + 5 steps, a checkpoint every step), its uninterrupted run's losses, and for each file
    sync of that run the file synced and how many step rows the metrics held then."""
    root = tmp_path_factory.mktemp("proc")
    path = root / "tiny.yaml"
    data = recipe_dict(tiny_lm_dir, tiny_clip_dir, world)
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # key order = mixture order
    with counted_syncs(root / "reference") as syncs:  # in-process: the same numbers and syncs as the CLI, faster
        Trainer(recipe_from_dict(data), root / "reference", progress=False).run()
    return path, losses(root / "reference"), syncs


# 0: killed in the checkpoint of step 9 (stage 2, step 4) after its weights, before its meta.json is synced;
# 1: in the checkpoint of step 2 (stage 1) before its trainer_state.pt is synced. Either resumes one step back.
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_seeded_point_then_resume_reproduces_the_losses(two_stage, tmp_path, seed):
    recipe_yaml, reference, syncs = two_stage
    # a file sync before the last step's row: between two checkpoints' files, before a manifest, after a rename
    before_end = [i + 1 for i, (_, rows) in enumerate(syncs) if rows < len(reference)]
    kill_at = random.Random(seed).choice(before_end)
    run = tmp_path / "run"
    proc = start_signalled(recipe_yaml, run, log=run.parent / "train.log", SIGNAL="SIGKILL", AT_SYNC=str(kill_at))
    proc.wait(timeout=240)
    assert proc.returncode == -signal.SIGKILL, output(run)
    logged = (run / "metrics.jsonl").read_text().count("\n")
    assert logged == syncs[kill_at - 1][1] < len(reference)  # killed where the reference run had that many rows

    proc = start_train(recipe_yaml, run, "--resume", tag="resume")
    proc.wait(timeout=240)
    said = output(run, "resume")
    assert proc.returncode == 0, said
    assert "resuming from" in said or "no usable checkpoint" in said, said
    assert_same_losses(losses(run), reference)  # metrics rows after the checkpoint were dropped and redone
    assert len(ckpt.list_checkpoints(run)) == 2  # keep_checkpoints default
    assert not list((run / "checkpoints").glob(".*"))  # no half-written folder left behind


def test_sigterm_finishes_the_step_checkpoints_and_exits_0(two_stage, tmp_path):
    recipe_yaml, reference, _ = two_stage
    run = tmp_path / "run"
    proc = start_signalled(
        recipe_yaml, run, "--set", "save_every=0", log=run.parent / "train.log", SIGNAL="SIGTERM", AT_BATCH="3"
    )
    proc.wait(timeout=240)
    text = output(run)
    assert proc.returncode == 0, text
    assert "stopped by SIGTERM: checkpoint written to" in text
    rows = losses(run)
    newest = ckpt.list_checkpoints(run)[0]
    ckpt.verify(newest)
    state = ckpt.load_trainer_state(newest)
    assert len(rows) == 3 and (state["stage"], state["step"]) == (0, 3)  # SIGTERM in step 3: it ends, then stops
    assert_same_losses(rows, reference[: len(rows)])


# -- in-process: SIGINT, checkpoint files ------------------------------------------------------
@pytest.fixture
def one_stage(tiny_lm_dir, tiny_clip_dir, world):
    def make(**top):
        return recipe_from_dict(recipe_dict(tiny_lm_dir, tiny_clip_dir, world, steps=(6,), **top))

    return make


def test_sigint_checkpoints_after_the_current_step(one_stage, tmp_path, capsys):
    trainer = Trainer(one_stage(save_every=0), tmp_path / "run", progress=False)
    original, calls = trainer._next_batch, {"n": 0}
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background

    def next_batch(batches):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3: Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return original(batches)

    trainer._next_batch = next_batch
    trainer.run()
    assert trainer.stopped and trainer.state == {"stage": 0, "step": 3}
    assert "stopped by SIGINT" in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["stage0-step0000003"]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_keep_last_n_checkpoints(one_stage, tmp_path):
    Trainer(one_stage(keep_checkpoints=3), tmp_path / "run", progress=False).run()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == [
        "stage1-step0000000",
        "stage0-step0000005",
        "stage0-step0000004",
    ]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_lm_dir, tiny_clip_dir, world):
    """A 6-step run stopped during step 6 (checkpoints at steps 2 and 4), and the full run's losses."""
    recipe = recipe_from_dict(recipe_dict(tiny_lm_dir, tiny_clip_dir, world, steps=(6,), save_every=2))
    root = tmp_path_factory.mktemp("interrupted")
    Trainer(recipe, root / "ref", progress=False).run()
    interrupted_run(recipe, root / "run", at_call=6)
    return recipe, root / "run", losses(root / "ref")


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "no manifest", "malicious pickle"])
def test_a_bad_newest_checkpoint_is_reported_and_the_previous_one_used(interrupted, tmp_path, capsys, damage):
    recipe, template, reference = interrupted
    run = tmp_path / "run"
    shutil.copytree(template, run)
    newest = ckpt.list_checkpoints(run)[0]
    assert newest.name == "stage0-step0000004"
    marker = tmp_path / "pwned"
    if damage == "truncate":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        expect = r"model\.safetensors: truncated or altered: 100 bytes"
    elif damage == "flip a byte":
        state = newest / ckpt.STATE
        raw = bytearray(state.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        state.write_bytes(bytes(raw))
        expect = r"trainer_state\.pt: corrupt: its sha256 differs"
    elif damage == "no manifest":  # killed after the files, before the manifest (cannot happen: tmp folder)
        (newest / ckpt.MANIFEST).unlink()
        expect = r"no manifest\.json"
    else:  # an attacker replaced the state and rewrote the manifest to match
        torch.save({"step": Evil(marker)}, newest / ckpt.STATE)
        ckpt.write_manifest(newest)
        expect = r"trainer_state\.pt: refused to load"
    capsys.readouterr()
    resumed = Trainer(recipe, run, resume=True, progress=False)
    said = capsys.readouterr().out
    assert re.search(expect, said), said
    assert "stage0-step0000004 is unusable" in said and "resuming from" in said and "stage0-step0000002" in said
    assert resumed.state["step"] == 2 and not marker.exists()
    resumed.run()
    assert_same_losses(losses(run), reference)
    assert (run / "checkpoints" / "stage0-step0000004.corrupt").is_dir()  # kept for inspection


def test_a_crash_inside_a_checkpoint_write_leaves_the_previous_one_usable(
    interrupted, one_stage, tmp_path, monkeypatch
):
    """Dies while writing checkpoint 3 (files half there, no manifest) and mid-way through a metrics row."""
    _, _, reference = interrupted  # checkpoint frequency does not change the losses
    recipe, run = one_stage(save_every=1), tmp_path / "run"
    real, calls = torch.save, {"n": 0}

    def save(obj, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            Path(path).write_bytes(b"PK\x03\x04 half a zip")
            raise Interrupt
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(Interrupt):
        Trainer(recipe, run, progress=False).run()
    monkeypatch.setattr(torch, "save", real)
    assert [p.is_dir() for p in (run / "checkpoints").glob(".stage0-step0000003.*.tmp")] == [True]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"stage": "align", "st')
    Trainer(recipe, run, resume=True, progress=False).run()
    assert_same_losses(losses(run), reference)
    assert not list((run / "checkpoints").glob(".*"))


class Evil:
    """Unpickling this would create `marker` (any callable could run instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Evil(marker)}, tmp_path / ckpt.STATE)
    with pytest.raises(ckpt.CheckpointError, match="refused to load: it holds objects other than tensors"):
        ckpt.load_trainer_state(tmp_path)
    assert not marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in (ROOT / "mmbridge").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((path.name, text[m.start() : i]))
        assert "pickle.load(" not in text and "pickle.loads(" not in text, path
    assert calls and all("weights_only=True" in c for _, c in calls), calls


# -- non-finite losses and gradients -----------------------------------------------------------
@OBJECTIVES.register("test_nonfinite")
class NonFiniteAt(NextTokenLoss):
    """Next-token loss, made NaN (or with NaN gradients) at the given 1-based steps."""

    def __init__(self, model, steps=(), where="loss"):
        super().__init__(model)
        self.steps, self.where, self.calls = set(steps), where, 0

    def forward(self, model, batch, normalizer):
        out = super().forward(model, batch, normalizer)
        self.calls += 1
        if self.calls not in self.steps:
            return out
        if self.where == "loss":
            return LossOutput(out.loss * float("nan"), {"lm": float("nan")})
        out.loss.register_hook(lambda g: g * float("nan"))
        return out


def nonfinite_recipe(one_stage, steps, where="loss", **top):
    recipe = one_stage(save_every=2, **top)
    recipe.stages[0].steps = 8
    recipe.stages[0].objective = {"name": "test_nonfinite", "steps": list(steps), "where": where}
    return recipe


def test_isolated_nonfinite_steps_are_skipped_and_counted(one_stage, tmp_path, capsys):
    trainer = Trainer(nonfinite_recipe(one_stage, [2, 5]), tmp_path / "run", progress=False)
    trainer.run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["step"] for r in rows if "skipped" in r] == [2, 5] and trainer.nonfinite == 2
    assert "loss term 'lm' = nan" in rows[1]["skipped"] and len(rows[1]["ids"]) == 4
    assert "skipped 2 step(s) with a non-finite loss or gradient" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_in_a_row_stops_with_a_diagnostic_and_keeps_the_last_good_checkpoint(one_stage, tmp_path, where):
    trainer = Trainer(
        nonfinite_recipe(one_stage, range(3, 9), where, max_nonfinite_steps=3), tmp_path / "run", progress=False
    )
    with pytest.raises(NonFiniteError) as err:
        trainer.run()
    msg = str(err.value)
    assert msg.startswith("stage 'align' step 5: 3 steps in a row with a non-finite loss or gradient")
    assert ("loss term 'lm' = nan" if where == "loss" else "first non-finite gradient in bridge.") in msg
    ids = re.search(r"batch sample ids (\[.*?\])", msg).group(1)
    assert len(eval(ids)) == 4 and "stage0-step0000002" in msg
    good = ckpt.list_checkpoints(tmp_path / "run")[0]
    assert good.name == "stage0-step0000002"  # no checkpoint from the bad steps
    ckpt.verify(good)
    from safetensors.torch import load_file

    own = trainer.model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in load_file(good / "model.safetensors").items())  # nothing applied


# -- disk and run directory ---------------------------------------------------------------------
def test_unwritable_run_directory_is_refused_before_training(one_stage, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ckpt.CheckpointError, match=r"run directory .*a-file/run is not writable"):
        Trainer(one_stage(), blocker / "run", progress=False)
    from mmbridge.cli import main

    recipe_yaml = tmp_path / "r.yaml"
    recipe_yaml.write_text(yaml.safe_dump(recipe_to_dict(one_stage()), sort_keys=False))
    with pytest.raises(SystemExit) as code:
        main(["train", str(recipe_yaml), "--out", str(blocker / "run")])
    assert code.value.code == 1 and "is not writable" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ckpt.CheckpointError, match="not writable"):
            Trainer(one_stage(), locked, progress=False)


def test_a_full_disk_is_detected_before_training(one_stage, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    with pytest.raises(ckpt.CheckpointError, match=r"97\.7 KiB free, but training needs about .* MiB"):
        Trainer(one_stage(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_full_disk_at_checkpoint_time_stops_with_the_previous_checkpoint_intact(one_stage, tmp_path, monkeypatch):
    trainer = Trainer(one_stage(save_every=2), tmp_path / "run", progress=False)
    real, calls = ckpt.save_file, {"n": 0}

    def save_file(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    with pytest.raises(ckpt.CheckpointError, match=r"could not write .*stage0-step0000004: No space left on device"):
        trainer.run()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["stage0-step0000002"]
    ckpt.verify(tmp_path / "run" / "checkpoints" / "stage0-step0000002")
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))
