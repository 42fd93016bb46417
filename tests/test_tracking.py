"""Experiment tracking (train/tracking.py): the scalars of metrics.jsonl, read back from real TensorBoard event
files and a real offline W&B run file."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

from mmbridge.config import RecipeError, recipe_from_dict  # noqa: E402
from mmbridge.train.tracking import Trackers  # noqa: E402
from tests.conftest import tiny_recipe_dict  # noqa: E402


def wandb_history(run_dir) -> list[dict]:
    """The history rows of every offline W&B run file under `run_dir`, in order: {"_step": n, key: value}.

    A `.wandb` file is a 7-byte W&B header, then LevelDB-log records (32 KiB blocks; each record a 7-byte header:
    checksum, length, type full/first/middle/last) holding `Record` protobufs."""
    from wandb.proto.wandb_internal_pb2 import Record

    rows = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", path
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (2, 3):  # first, middle
                pending += chunk
                continue
            if kind not in (1, 4):
                continue
            rec = Record.FromString(pending + chunk)
            pending = b""
            if rec.WhichOneof("record_type") == "history":
                row = {"_step": rec.history.step.num}
                row.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
                rows.append(row)
    return rows


def tb_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def quiet_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-elsewhere"))


def test_trackers_carry_the_metrics_rows(tiny_lm_dir, tiny_clip_dir, world, tmp_path, quiet_wandb):
    from mmbridge.train.trainer import Trainer

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["log"] = {"tensorboard": True, "wandb": {"project": "mmbridge-test", "mode": "offline"}}
    run = tmp_path / "run"
    trainer = Trainer(recipe_from_dict(data), run, progress=False)
    trainer.run()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # two stages of 3 steps: the trackers count steps over the run
    trainer.log_eval({"cider": 0.25, "n": 8, "by_type": {"a": 1}})

    tb = tb_scalars(run / "tensorboard")
    for key in ("loss", "grad_norm", "tok_per_s", "data_s", "step_s", "tokens", "lr_bridge"):
        assert [s for s, _ in tb[f"train/{key}"]] == [1, 2, 3, 4, 5, 6], key
        assert [v for _, v in tb[f"train/{key}"]] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    assert [s for s, _ in tb["train/lr_lm"]] == [4, 5, 6]  # the LoRA group trains in stage 2 only
    if rows[0]["mfu"] is not None:
        assert "train/mfu" in tb
    assert tb["eval/cider"] == [(6, 0.25)] and "eval/by_type" not in tb

    history = wandb_history(run)
    train = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in train] == [1, 2, 3, 4, 5, 6]
    assert [h["train/loss"] for h in train] == [r["loss"] for r in rows]  # exact: W&B keeps float64
    assert [h["train/lr_bridge"] for h in train] == [r["lr_bridge"] for r in rows]
    assert [h for h in history if "eval/cider" in h][0]["eval/cider"] == 0.25
    ids = {p.name.rsplit("-", 1)[1] for p in run.glob("wandb/offline-run-*")}
    assert ids == {(run / "wandb-id").read_text().strip()}  # the eval resumed the same W&B run
    assert not (tmp_path / "wandb-elsewhere").exists() or not any((tmp_path / "wandb-elsewhere").iterdir())


def test_a_resumed_run_shows_each_step_once(tiny_lm_dir, tiny_clip_dir, world, tmp_path, quiet_wandb):
    from mmbridge.train.trainer import Trainer
    from tests.conftest import interrupted_run

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data.update(save_every=2, log={"tensorboard": True})
    for st in data["stages"]:
        st["steps"] = 5
    recipe, run = recipe_from_dict(data), tmp_path / "run"
    interrupted_run(recipe, run, 9)  # during stage 2, step 4: step 3 was logged after the checkpoint, and is redone
    Trainer(recipe, run, resume=True, progress=False).run()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    loss = tb_scalars(run / "tensorboard")["train/loss"]
    assert len(list((run / "tensorboard").glob("events.*"))) == 2 and len(rows) == 10
    assert loss == [(i + 1, pytest.approx(r["loss"], rel=1e-6)) for i, r in enumerate(rows)]


def test_off_by_default(tmp_path):
    trackers = Trackers({}, tmp_path)
    trackers.log({"loss": 1.0}, 1)
    trackers.close()
    assert list(tmp_path.iterdir()) == []


def test_bad_log_sections_and_missing_packages(tiny_lm_dir, tiny_clip_dir, world, monkeypatch):
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    with pytest.raises(RecipeError, match=r"recipe.log: unknown key\(s\) \['mlflow'\]"):
        recipe_from_dict({**data, "log": {"mlflow": True}})
    with pytest.raises(RecipeError, match=r"recipe.log.wandb: unknown key\(s\) \['projekt'\]"):
        recipe_from_dict({**data, "log": {"wandb": {"projekt": "x"}}})
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importing it fails
    with pytest.raises(RecipeError, match=r"`wandb` package is not installed; install it with `pip install wandb`"):
        recipe_from_dict({**data, "log": {"wandb": {"mode": "offline"}}})
    recipe_from_dict({**data, "log": {"tensorboard": True, "wandb": False}})  # asks only for what is installed
