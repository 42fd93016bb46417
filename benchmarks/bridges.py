"""The bridge benchmark: six bridges and two LM-side tunings, one LM, one vision encoder, the same steps and data.

Each bridge is trained by the same trainer on the built-in shapes world with the benchmark's own two
stages (LLaVA-1.5's; stage 1: captions, bridge only; stage 2: captions + VQA + grounding, bridge + LoRA
on the LM), on the demo recipe's vision encoder, LM and world, then scored on the held-out test split.
Prints a table; its last line is the table as one JSON object.

    python benchmarks/bridges.py                      # the full run: 25 min alone on the 2-core CPU
    python benchmarks/bridges.py --smoke              # every row at toy size (tiny models and world), seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mmbridge.config import load_recipe
from mmbridge.data.llava import read_llava_json
from mmbridge.data.sources import resolve_source
from mmbridge.demo import baselines
from mmbridge.eval.evaluate import evaluate_records
from mmbridge.train.parts import count_params

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tiny_models, tiny_sets, tiny_world  # noqa: E402

SMOKE_KEYS = ("benchmark", "rows", "blind_baselines_full_test")  # what the last JSON line holds (the smoke test)

# Query-based bridges get the pool-adapter's budget of 16 tokens per image, so that the grounding
# comparison (InfMLLM) is about keeping positions, not about token count.
BRIDGES = {
    "mlp": {"name": "mlp"},  # LLaVA-1.5: every encoder token
    "pool_adapter": {"name": "pool_adapter", "pooled": 4},  # InfMLLM
    "qformer": {"name": "qformer", "queries": 16},  # BLIP-2, from MiniLM (no ITC/ITM/ITG stage: same stages for all)
    "resampler": {"name": "resampler", "latents": 16, "dim": 512},  # Flamingo's Perceiver Resampler
    "gated_xattn": {"name": "gated_xattn", "latents": 16, "dim": 512, "every": 4},  # Flamingo
    "visual_expert": {"name": "visual_expert"},  # CogVLM
}
# LM-side tuning on the pool-adapter (the bridge trains in both stages): stage 2 swaps LoRA for MoE-tuning (MoE-LLaVA:
# 4 experts, top-2, every other layer) or LaVIN's mixture-of-modality adapters
TUNINGS = {
    "moe_tuning": (
        "pool_adapter",
        {
            "train": {"bridge": "full", "lm": "moe"},
            "moe": {"experts": 4, "top_k": 2, "layers": "every_other", "aux_weight": 0.01},
        },
    ),
    "mma": ("pool_adapter", {"train": {"bridge": "full", "lm": "mma"}, "mma": {"dim": 8}}),
}
TASKS = {"caption": ("cider", 24), "vqa": ("vqa_accuracy", 8), "grounding": ("grounding_acc50", 24)}
# the comparison's own stages: whatever the demo's stages and objectives become, every bridge trains these
STAGES = [
    {
        "name": "align",
        "data": {"world/train/caption": 1.0},
        "objective": {"name": "lm"},
        "train": {"vision": "frozen", "bridge": "full", "lm": "frozen"},
        "lr": {"bridge": 2.0e-3},
        "batch_size": 16,
        "warmup": 0.1,
    },
    {
        "name": "multitask",
        "data": {"world/train/caption": 1.0, "world/train/vqa": 1.0, "world/train/grounding": 1.0},
        "objective": {"name": "lm"},
        "train": {"vision": "frozen", "bridge": "full", "lm": "lora"},
        "lr": {"bridge": 1.0e-3, "lm": 1.0e-3},
        "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "batch_size": 8,
        "warmup": 0.05,
        "group_by_length": 16,
    },
]


def recipe_for(bridge: dict, args, stage2: dict | None = None):
    """The bundled demo recipe's vision encoder, LM and world with this bridge, the benchmark's stages and steps;
    `stage2`: keys that replace stage 2's (what the LM trains)."""
    stages = [{**STAGES[0], "steps": args.align_steps}, {**STAGES[1], "steps": args.multitask_steps, **(stage2 or {})}]
    sets = [
        f"model.bridge={json.dumps(bridge)}",
        f"stages={json.dumps(stages)}",
        f"threads={args.threads}",
        "log_every=1",
        *args.sets,
    ]
    return load_recipe("demo", sets)


def evaluate(model, processor, recipe, limit: int) -> dict:
    scores = {}
    for task, (metric, max_new) in TASKS.items():
        src = resolve_source(recipe, f"world/test/{task}")
        records = read_llava_json(src.json)[0][:limit]
        m, _ = evaluate_records(model, processor, records, src.images, task, max_new_tokens=max_new, progress=False)
        scores[metric] = round(m[metric], 4)
    return scores


def run_bridge(name: str, args) -> dict:
    from mmbridge.train.trainer import Trainer

    bridge, stage2 = TUNINGS.get(name, (name, None))
    recipe = recipe_for(BRIDGES[bridge], args, stage2)
    run_dir = Path(args.out) / name
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    trainer = Trainer(recipe, run_dir, progress=False)
    trainer.run()
    t_train = time.perf_counter() - t0
    model, processor = trainer.model, trainer.processor
    trainable, _ = count_params(model)  # as in the last stage: bridge + LoRA adapters (or experts, or MMA)
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    t1 = time.perf_counter()
    row = {
        "trainable_params": trainable,
        "bridge_params": sum(p.numel() for p in model.bridge.parameters()),
        "visual_tokens": model.bridge.visual_tokens,
        "lm_tokens_per_image": model.bridge.num_tokens,
        "step_s": round(statistics.median(r["step_s"] for r in steps), 3),
        "final_loss": round(steps[-1]["loss"], 4),
        **evaluate(model, processor, recipe, args.limit),
    }
    row["train_s"], row["eval_s"] = round(t_train, 1), round(time.perf_counter() - t1, 1)
    print(f"{name}: {row}", flush=True)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = [*BRIDGES, *TUNINGS]
    parser.add_argument(
        "--bridges",
        default=None,
        help="comma-separated subset of " + ",".join(choices) + " (default: all; --smoke: mlp,moe_tuning)",
    )
    parser.add_argument("--align-steps", type=int, default=10)
    parser.add_argument("--multitask-steps", type=int, default=40)
    parser.add_argument("--limit", type=int, default=40, help="test records per task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-bridges")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="toy sizes: tiny models and world, one step per stage, 2 records per task (seconds)",
    )
    args = parser.parse_args(argv)
    names = (args.bridges or ("mlp,moe_tuning" if args.smoke else ",".join(choices))).split(",")
    unknown = set(names) - set(choices)
    if unknown:
        parser.error(f"unknown bridge(s) {sorted(unknown)}; choose from {choices}")
    with tempfile.TemporaryDirectory() as tmp:
        args.sets = []
        if args.smoke:
            args.sets = tiny_sets(tiny_models(tmp), tiny_world(tmp))
            args.align_steps = args.multitask_steps = 1
            args.limit, args.threads, args.out = 2, 1, str(Path(tmp) / "runs")
        return run(names, args)


def run(names: list[str], args) -> dict:
    t0 = time.perf_counter()
    rows = {name: run_bridge(name, args) for name in names}
    if "mlp" in rows:
        for row in rows.values():
            row["step_time_vs_mlp"] = round(row["step_s"] / rows["mlp"]["step_s"], 2)
    model = recipe_for(BRIDGES["mlp"], args).model
    table = {
        "benchmark": "bridges",
        "smoke": args.smoke,
        "lm": model.lm,
        "vision": {**model.vision, "frozen": True},
        "align_steps": args.align_steps,
        "multitask_steps": args.multitask_steps,
        "batch_sizes": [s["batch_size"] for s in STAGES],
        "test_records_per_task": args.limit,
        "total_s": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    # blind reference points on the full test split: most frequent caption, majority answer, mean box
    table["blind_baselines_full_test"] = {
        k: round(v, 4) for k, v in baselines(recipe_for(BRIDGES["mlp"], args)).items()
    }
    print_table(rows)
    print(json.dumps(table))
    return table


def print_table(rows: dict) -> None:
    cols = [
        ("trainable_params", "trainable"),
        ("visual_tokens", "vis tok"),
        ("step_time_vs_mlp", "step/mlp"),
        ("cider", "CIDEr"),
        ("vqa_accuracy", "VQA acc"),
        ("grounding_acc50", "Acc@0.5"),
    ]
    print(f"{'bridge':<14}" + "".join(f"{label:>11}" for _, label in cols))
    for name, row in rows.items():
        cells = []
        for key, _ in cols:
            v = row.get(key, "")
            cells.append(f"{v / 1e6:>10.2f}M" if key == "trainable_params" else f"{v:>11}")
        print(f"{name:<14}" + "".join(cells))


if __name__ == "__main__":
    main()
