"""Data-pipeline headroom: samples/s the loader delivers vs samples/s a training step consumes.

At the demo's scale (stage 2 of the bundled recipe: SmolLM2-135M with LoRA, EfficientNet-Lite0 at
256 px frozen, pool-adapter bridge, batch 8, captions + VQA + grounding), with the recipe's
worker count (`num_workers`, default 0: images are read in the training process). The loader is
timed alone over `--batches` micro-batches (PNG decoding, resizing, tokens already cached); the
step (forward, backward, AdamW) over `--steps` steps after one warm-up step, median reported.
`--pack` measures the packed variant of the stage. The last line is one JSON object.

    python benchmarks/dataloader.py              # ~3 min on the 2-core CPU
    python benchmarks/dataloader.py --steps 2    # fewer steps when the CPU is contended
    python benchmarks/dataloader.py --smoke      # the same path at toy size (tiny models and world), seconds
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

import torch

from mmbridge.config import load_recipe
from mmbridge.objectives import build_objective
from mmbridge.train.parts import apply_stage_modes, param_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ready_for_stage, tiny_models, tiny_sets, tiny_world, toy_stages  # noqa: E402

SMOKE_KEYS = ("benchmark", "loader_samples_per_s", "step_s", "step_samples_per_s", "headroom")  # the last JSON line


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40, help="micro-batches the loader alone delivers")
    parser.add_argument("--steps", type=int, default=4, help="training steps timed (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pack", action="store_true", help="the stage with pack: true (rows of max_length)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="toy sizes: tiny models and world, LoRA in the top layer, 3 batches, 1 step",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sets = []
        if args.smoke:
            sets = [*tiny_sets(tiny_models(tmp), tiny_world(tmp)), *toy_stages("demo")]
            args.batches, args.steps = 3, 1
        return measure(args, sets)


def measure(args, sets: list[str]) -> dict:
    from mmbridge.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    sets = [*sets, f"threads={args.threads}"] + (
        ["stages.1.pack=true", "stages.1.group_by_length=0", "stages.1.batch_size=3"] if args.pack else []
    )
    recipe = load_recipe("demo", sets)
    stage = recipe.stages[1]
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(recipe, run_dir, progress=False)
    ready_for_stage(trainer, 1)  # e.g. the objects stage's vocabulary, without training it
    model = trainer.model

    # 1. the data pipeline alone
    loader, _ = trainer.loader(stage, 0)
    it = iter(loader)
    next(it)  # workers started, first batch
    t0, samples = time.perf_counter(), 0
    for _ in range(args.batches):
        samples += len(next(it)["ids"])
    data_rate = samples / (time.perf_counter() - t0)
    del it

    # 2. training steps on the same stream
    torch.manual_seed(stage.seed)
    apply_stage_modes(model, stage)
    objective = build_objective(stage.objective, model)
    optimizer = torch.optim.AdamW(param_groups(model, stage, objective))
    it = iter(trainer.loader(stage, 0)[0])
    times, n_samples = [], []
    for s in range(args.steps + 1):
        b = next(it)
        t0 = time.perf_counter()
        n = max(int((b["labels"][:, 1:] != -100).sum()), 1)
        objective(model, b, normalizer=n).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if s:
            times.append(time.perf_counter() - t0)
            n_samples.append(len(b["ids"]))
    step_s = statistics.median(times)
    step_rate = statistics.mean(n_samples) / step_s
    result = {
        "benchmark": "dataloader",
        "smoke": args.smoke,
        "stage": stage.name,
        "packed": args.pack,
        "num_workers": recipe.num_workers,
        "threads": args.threads,
        "batch_size": stage.batch_size,
        "samples_per_batch": round(statistics.mean(n_samples), 2),
        "loader_samples_per_s": round(data_rate, 1),
        "step_s": round(step_s, 3),
        "step_samples_per_s": round(step_rate, 2),
        "headroom": round(data_rate / step_rate, 1),
        "loader_batches": args.batches,
        "steps": args.steps,
    }
    print(
        f"loader {data_rate:.1f} samples/s, training step {step_rate:.2f} samples/s "
        f"({step_s:.2f} s/step): headroom {data_rate / step_rate:.1f}x"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
