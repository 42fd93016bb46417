"""MFU of a training step at the demo's real scale: EfficientNet-Lite0 (256 px) + pool-adapter (16
tokens per image) + SmolLM2-135M, the demo's `multitask` stage (bridge full, LoRA r=16 on q/k/v/o).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mfu.py [--steps 3] [--configs demo,packed256,packed1024]
    python benchmarks/mfu.py --smoke    # every config at toy size (tiny models and world, 1 timed step), seconds

Configs: `demo` is the demo's batch (8 samples, padded, grouped by length); `packedN` packs samples
into rows of N tokens (`pack: true`, `model.max_length: N`), `--rows` rows per batch. Each step is
forward + backward + AdamW on real batches of the demo's shapes world. Model FLOPs are counted as
the trainer counts them (`mmbridge/train/flops.py`); the first step is a warm-up and is left out.
On CPU the peak is a measured fp32 matmul peak at the same thread count, measured before and after
the steps (the higher one is used: another process's load lowers it and would overstate MFU); on a
GPU the steps run in bf16 autocast against the GPU's dense bf16 peak (--smoke: the cached CPU peak, measured
only when none is cached). The model is what stage 2 meets (the objects stage's vocabulary is chosen, untrained).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mmbridge.config import load_recipe  # noqa: E402
from mmbridge.objectives import build_objective  # noqa: E402
from mmbridge.train.flops import StepFlops, cpu_peak, device_peak  # noqa: E402
from mmbridge.train.parts import apply_stage_modes, param_groups  # noqa: E402
from mmbridge.train.trainer import Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ready_for_stage, tiny_models, tiny_sets, tiny_world, toy_stages  # noqa: E402

SMOKE_KEYS = ("benchmark", "device", "peak_gflop_per_s", "results", "best_mfu")  # the last JSON line's keys
CONFIGS = {
    "demo": [],
    "packed256": ["model.max_length=256", "stages.1.pack=true", "stages.1.group_by_length=0"],
    "packed1024": ["model.max_length=1024", "stages.1.pack=true", "stages.1.group_by_length=0"],
}


def measure(name: str, overrides: list[str], steps: int, rows: int, device: torch.device) -> dict:
    recipe = load_recipe("demo", overrides + ([f"stages.1.batch_size={rows}"] if name != "demo" else []))
    with tempfile.TemporaryDirectory() as run:
        trainer = Trainer(recipe, run, progress=False)
    ready_for_stage(trainer, 1)
    stage = recipe.stages[1]
    model = trainer.model
    torch.manual_seed(stage.seed)
    apply_stage_modes(model, stage)
    count = StepFlops(model)
    objective = build_objective(stage.objective, model)
    model.to(device)
    objective.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, stage, objective), betas=(0.9, 0.999), eps=1e-8)
    loader, _ = trainer.loader(stage, 0)
    batches = iter(loader)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, flops, tokens, padded = [], [], [], []
    for _ in range(steps + 1):
        batch = next(batches)
        flops.append(count(batch))
        tokens.append(int(batch["attention_mask"].sum()))
        padded.append(batch["input_ids"].numel())
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        sync()
        t0 = time.perf_counter()
        with autocast:
            out = objective(model, batch, normalizer=max(int((batch["labels"][:, 1:] != -100).sum()), 1))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    times, flops, tokens, padded = times[1:], flops[1:], tokens[1:], padded[1:]
    rate = statistics.median(f / t for f, t in zip(flops, times))
    return {
        "config": name,
        "batch": f"{rows if name != 'demo' else stage.batch_size} {'rows' if name != 'demo' else 'samples'}",
        "max_length": recipe.model.max_length,
        "tokens_per_step": round(statistics.mean(tokens)),
        "padded_tokens_per_step": round(statistics.mean(padded)),
        "gflop_per_step": round(statistics.mean(flops) / 1e9, 1),
        "step_s_median": round(statistics.median(times), 3),
        "model_gflop_per_s": round(rate / 1e9, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per config (after one warm-up)")
    parser.add_argument("--rows", type=int, default=8, help="rows per batch for the packed configs")
    parser.add_argument("--configs", default="demo,packed256,packed1024")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="toy sizes: tiny models and world, LoRA in the top layer, 2 rows, 1 timed step, 1 thread",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.sets = []
        if args.smoke:
            args.sets = [*tiny_sets(tiny_models(tmp), tiny_world(tmp)), *toy_stages("demo")]
            args.steps, args.rows = 1, 2
            torch.set_num_threads(1)
        run(args)


def run(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    print(
        f"device {device}, {threads} thread(s), torch {torch.__version__}; demo stage 'multitask' "
        f"(vision frozen, bridge full, LoRA r=16 on q/k/v/o); {args.steps} timed steps per config",
        flush=True,
    )
    peak_before = cpu_peak(refresh=not args.smoke) if device.type == "cpu" else device_peak(device)[0]
    results = []
    for name in args.configs.split(","):
        r = measure(name, [*args.sets, *CONFIGS[name]], args.steps, args.rows, device)
        results.append(r)
        print(json.dumps(r), flush=True)
    peak_after = cpu_peak(refresh=not args.smoke) if device.type == "cpu" else peak_before
    peak = max(peak_before, peak_after) if peak_before else None
    how = f"measured fp32 matmul peak ({threads} thread(s))" if device.type == "cpu" else device_peak(device)[1]
    if peak:
        print(
            f"peak: {how}: {peak_before / 1e9:.1f} GFLOP/s before, {peak_after / 1e9:.1f} after; using {peak / 1e9:.1f}"
        )
    for r in results:  # a GPU without a known datasheet peak gets no MFU (see mmbridge/train/flops.py)
        r["mfu"] = round(r["model_gflop_per_s"] * 1e9 / peak, 4) if peak else None
        print(
            f"  {r['config']:>11}: {r['tokens_per_step']:>5} tokens/step, {r['gflop_per_step']:>7.1f} GFLOP/step, "
            f"{r['step_s_median']:>7.2f} s/step, {r['model_gflop_per_s']:>6.1f} GFLOP/s, MFU "
            f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%')}"
        )
    print(
        json.dumps(
            {
                "benchmark": "mfu",
                "smoke": args.smoke,
                "device": str(device),
                "threads": threads,
                "peak_gflop_per_s": round(peak / 1e9, 2) if peak else None,
                "peak_how": how,
                "target": 0.35 if device.type == "cpu" else 0.45,
                "results": results,
                "best_mfu": max((r["mfu"] for r in results if r["mfu"] is not None), default=None),
            }
        )
    )


if __name__ == "__main__":
    main()
