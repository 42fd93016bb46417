"""Cost of experiment tracking per training step (train/tracking.py) against a demo training step.

Trains `--steps` steps of the demo's multitask stage (SmolLM2-135M with LoRA, batch 8, on a small shapes world)
with TensorBoard and W&B (offline) on, the reference: its median step time (metrics.jsonl, first step left out).
Then sends that run's own metrics rows `--rows` times more through fresh trackers, timing each `log` call:
TensorBoard alone, W&B alone, both; the one-off start (W&B's `init`) and close are reported apart. The ratio
is the per-step cost of both trackers over the demo step (target: under 1 %).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/tracking_cost.py [--steps 6] [--rows 500]

The last line printed is one JSON object. `--smoke`: the same on tiny models and world (3 steps, 20 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from mmbridge.config import load_recipe  # noqa: E402
from mmbridge.train.tracking import Trackers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ready_for_stage, tiny_models, tiny_sets, tiny_world  # noqa: E402

SMOKE_KEYS = ("benchmark", "demo_step_s", "log_us", "start_s", "both_over_step", "ok")  # last line
QUICK_WORLD = ["world.n_train=200", "world.n_val=50", "world.n_test=50", "world.root=.cache/shapes-world-quick"]
TRACKERS = {
    "tensorboard": {"tensorboard": True},
    "wandb": {"wandb": {"project": "tracking-cost", "mode": "offline"}},
    "both": {"tensorboard": True, "wandb": {"project": "tracking-cost", "mode": "offline"}},
}


def reference_run(sets: list[str], steps: int, folder: Path) -> list[dict]:
    """Train the demo's multitask stage for `steps` steps with both trackers on; its metrics rows."""
    from mmbridge.train.trainer import Trainer

    recipe = load_recipe("demo", sets)
    recipe.stages[1].steps = steps
    recipe.log = TRACKERS["both"]
    trainer = Trainer(recipe, folder / "run", progress=False)
    ready_for_stage(trainer, 1)  # the objects bridge's vocabulary, as stage 1 would choose it
    trainer.state = {"stage": 1, "step": 0}  # stage 1 is not trained: the run starts at the multitask stage
    trainer.run()
    return [json.loads(x) for x in (folder / "run" / "metrics.jsonl").read_text().splitlines()]


def log_cost(log: dict, rows: list[dict], n: int, folder: Path) -> dict:
    """Median µs of one `Trackers.log` call over `n` calls (the run's rows in turn), and the start and close."""
    trackers = Trackers(log, folder)
    t0 = time.perf_counter()
    trackers.log(rows[0], 1)  # opens the trackers
    start = time.perf_counter() - t0
    times = []
    for k in range(n):
        t0 = time.perf_counter()
        trackers.log(rows[k % len(rows)], k + 2)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    trackers.close()
    return {
        "log_us": round(statistics.median(times) * 1e6, 1),
        "mean_us": round(statistics.fmean(times) * 1e6, 1),
        "start_s": round(start, 3),
        "close_s": round(time.perf_counter() - t0, 3),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="demo steps of the reference run")
    ap.add_argument("--rows", type=int, default=500, help="log calls timed per tracker setting")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: tiny models and world, 3 steps, 20 rows")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sets = QUICK_WORLD
        if args.smoke:
            sets = tiny_sets(tiny_models(tmp), tiny_world(tmp)) + ["stages.1.batch_size=2", "stages.1.lora.layers=1"]
            args.steps, args.rows = 3, 20
        os.environ.setdefault("WANDB_DIR", tmp)
        rows = reference_run(sets, args.steps, Path(tmp))
        step_s = statistics.median(r["step_s"] for r in rows[1:] or rows)
        costs = {name: log_cost(log, rows, args.rows, Path(tmp) / name) for name, log in TRACKERS.items()}
    both = costs["both"]["log_us"] / 1e6
    result = {
        "benchmark": "tracking_cost",
        "smoke": args.smoke,
        "steps": len(rows),
        "rows": args.rows,
        "scalars_per_row": len([k for k, v in rows[-1].items() if isinstance(v, (int, float))]) - 1,
        "demo_step_s": round(step_s, 3),
        "log_us": {k: v["log_us"] for k, v in costs.items()},
        "mean_us": {k: v["mean_us"] for k, v in costs.items()},
        "start_s": {k: v["start_s"] for k, v in costs.items()},
        "close_s": {k: v["close_s"] for k, v in costs.items()},
        "both_over_step": round(both / step_s, 6),
        "ok": both / step_s < 0.01,
    }
    print(
        f"demo step {step_s:.3f} s; per-step logging: "
        + ", ".join(f"{k} {v['log_us']:.0f} µs" for k, v in costs.items())
        + f" (both: {100 * both / step_s:.3f} % of a step)"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
