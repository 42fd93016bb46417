"""How the demo's held-out metrics grow with stage-2 steps: the same recipe, one whole run per length.

    python benchmarks/demo_growth.py --steps 170 340 680 [--set KEY=VALUE …] [--out runs/growth]
    python benchmarks/demo_growth.py --smoke     # one 1-step run on tiny models and world, in a temporary folder

Each length is a full `mmbridge demo` run (its own warmup + cosine schedule, not a checkpoint of a
longer run) with `stages.1.steps` set; runs go to OUT/steps<N>. Prints one table, then every run's
metrics as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mmbridge.demo import run_demo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tiny_models, tiny_sets, tiny_world, toy_stages  # noqa: E402

SMOKE_KEYS = ("benchmark", "overrides", "runs")  # what the last JSON line holds (the smoke test reads this)
COLUMNS = ("cider", "vqa_accuracy", "grounding_acc50", "vqa_image_gain", "train_seconds", "total_seconds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[170, 340, 680], help="stage-2 step counts")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    ap.add_argument("--out", default="runs/growth")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="toy sizes: tiny models and world, one step per stage, a few test records per task",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.set = [
                *tiny_sets(tiny_models(tmp), tiny_world(tmp)),
                *toy_stages("demo", steps=1),
                "eval.caption.limit=2",
                "eval.vqa.limit=16",
                "eval.grounding.limit=2",
                *args.set,
            ]
            args.steps, args.out = [1], str(Path(tmp) / "runs")
        rows = {}
        for n in args.steps:
            m = run_demo(out=str(Path(args.out) / f"steps{n}"), overrides=[f"stages.1.steps={n}", *args.set])
            rows[n] = {k: m[k] for k in COLUMNS} | {"vqa_by_qtype": m["vqa_by_qtype"]}
    print("\nstage-2 steps | " + " | ".join(COLUMNS))
    for n, r in sorted(rows.items()):
        print(
            f"{n:>13} | "
            + " | ".join(
                f"{r[k]:.3f}" if k not in ("train_seconds", "total_seconds") else f"{r[k]:.0f}" for k in COLUMNS
            )
        )
    print(
        json.dumps(
            {
                "benchmark": "demo_growth",
                "smoke": args.smoke,
                "overrides": args.set,
                "runs": {str(n): r for n, r in rows.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
