"""What a run writes about its schedule and its losses: the learning rates the optimizer used and logged (`lr_*`
in metrics.jsonl) are the warmup-cosine schedule worked out by hand, and each stage's loss plot draws that
stage's logged losses against its steps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from mmbridge.config import recipe_from_dict
from mmbridge.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict

R3 = math.sqrt(3) / 2  # cos(π/6)
# stage 1: 8 steps, warmup round(0.25 · 8) = 2 steps, floor 0.1: (s + 1) / 2 while warming up, then
# 0.1 + 0.45 · (1 + cos(π · (s - 2) / 6)) for s = 2 … 7, i.e. cos at 0, π/6, π/3, π/2, 2π/3, 5π/6
ALIGN = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + R3), 0.1 + 0.45 * 1.5, 0.55, 0.1 + 0.45 * 0.5, 0.1 + 0.45 * (1 - R3)]
# stage 2: 3 steps, warmup round(0.03 · 3) = 0, floor 0.2: 0.2 + 0.4 · (1 + cos(π · s / 3)) for s = 0, 1, 2
MULTITASK = [1.0, 0.2 + 0.4 * 1.5, 0.2 + 0.4 * 0.5]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_lm_dir, tiny_clip_dir, world):
    """A two-stage run with a schedule to check; what the optimizer's groups held at each of its steps, and the
    data of every loss plot as it was saved."""
    import matplotlib.figure

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["stages"][0].update(steps=8, batch_size=2, warmup=0.25, min_lr_ratio=0.1, lr={"bridge": 1e-2})
    data["stages"][1].update(steps=3, batch_size=2, min_lr_ratio=0.2, lr={"bridge": 1e-2, "lm": 2e-3})
    out = tmp_path_factory.mktemp("schedule") / "run"
    used, plots = [], {}
    step, savefig = torch.optim.AdamW.step, matplotlib.figure.Figure.savefig

    def recording_step(self, *args, **kwargs):
        used.append({g["name"]: g["lr"] for g in self.param_groups})
        return step(self, *args, **kwargs)

    def recording_savefig(fig, path, *args, **kwargs):
        (ax,) = fig.axes
        plots[str(path)] = {
            "title": ax.get_title(),
            "xlabel": ax.get_xlabel(),
            "ylabel": ax.get_ylabel(),
            "lines": [line.get_xydata().tolist() for line in ax.get_lines()],
        }
        return savefig(fig, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", recording_step)
        mp.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
        Trainer(recipe_from_dict(data), out, progress=False).run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows, used, plots


def test_logged_and_used_learning_rates_follow_the_warmup_cosine_schedule(run):
    _, rows, used, _ = run
    want = [{"bridge": 1e-2 * m} for m in ALIGN] + [{"bridge": 1e-2 * m, "lm": 2e-3 * m} for m in MULTITASK]
    assert [(r["stage"], r["step"]) for r in rows] == [("align", s) for s in range(1, 9)] + [
        ("multitask", s) for s in range(1, 4)
    ]
    assert len(used) == len(want)  # one optimizer step per logged step
    for row, lrs, expected in zip(rows, used, want):
        assert {k[3:]: v for k, v in row.items() if k.startswith("lr_")} == pytest.approx(expected, rel=1e-12)
        assert lrs == pytest.approx(expected, rel=1e-12)  # float64: a few roundings of 1.1e-16 apart


def test_each_stage_plot_draws_its_logged_losses(run):
    out, rows, _, plots = run
    for i, stage in enumerate(("align", "multitask"), 1):
        path = out / f"loss_{i}_{stage}.png"
        plot = plots[str(path)]
        assert plot["title"] == f"stage {stage}" and (plot["xlabel"], plot["ylabel"]) == ("step", "loss")
        assert plot["lines"] == [[[r["step"], r["loss"]] for r in rows if r["stage"] == stage]]
        with Image.open(path) as png:  # figsize 6 x 3.5 inches at 100 dpi
            assert png.format == "PNG" and png.size == (600, 350)
    assert set(plots) == {str(out / "loss_1_align.png"), str(out / "loss_2_multitask.png")}
