"""Cost of one Croc training step (split into matching, mask building and the rest) against a plain
captioning step on the same batch, at the demo's scale: EfficientNet-Lite0 + pool-adapter (16
tokens per image) + SmolLM2-135M, detailed captions, batch 8, prompt pool K = 2048.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/croc_overhead.py [--repeats 7] [--lm lora|full]

A step is forward + backward + AdamW update, with the parts the recipe's Croc stage trains. The
last line printed is one JSON object with the medians over the repeats. `--smoke`: the same at toy size
(tiny models and world, batch 2, pool 64, one repeat).
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

import torch  # noqa: E402

from mmbridge.config import load_recipe  # noqa: E402
from mmbridge.data.dataset import Collator, ConversationDataset  # noqa: E402
from mmbridge.data.sources import resolve_source  # noqa: E402
from mmbridge.models.build import build_model  # noqa: E402
from mmbridge.objectives import build_objective  # noqa: E402
from mmbridge.train.parts import apply_stage_modes, param_groups  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tiny_models, tiny_sets, tiny_world  # noqa: E402

SMOKE_KEYS = ("benchmark", "caption_step_s", "croc_step_s", "matching_fraction", "croc_over_caption")  # last line


def timed_step(model, objective, optimizer, batch) -> float:
    t0 = time.perf_counter()
    out = objective(model, batch, normalizer=max(int((batch["labels"][:, 1:] != -100).sum()), 1))
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="croc")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pool-size", type=int, default=2048)
    ap.add_argument("--matching", default="hungarian", choices=["hungarian", "nearest"])
    ap.add_argument("--attention", default="prefix", choices=["prefix", "visual"])
    ap.add_argument("--lm", default="lora", choices=["lora", "full"], help="how the LM trains in the Croc stage")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="toy sizes: tiny models and world, batch 2, pool 64, 1 repeat")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sets = []
        if args.smoke:
            sets = tiny_sets(tiny_models(tmp), tiny_world(tmp))
            args.batch_size, args.pool_size, args.repeats, args.threads = 2, 64, 1, 1
        return measure(args, sets)


def measure(args, sets: list[str]) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    recipe = load_recipe(args.recipe, sets)
    stage = next(s for s in recipe.stages if s.objective.get("name") == "croc")
    stage.train = {**stage.train, "lm": args.lm}
    model, processor = build_model(recipe.model)
    apply_stage_modes(model, stage)
    src = resolve_source(recipe, next(iter(stage.data)))
    data = ConversationDataset(src.json, src.images, processor)
    batch = Collator(processor)([data[i] for i in range(args.batch_size)])

    croc_cfg = {**stage.objective, "pool_size": args.pool_size, "matching": args.matching, "attention": args.attention}
    objectives = {"caption": build_objective({"name": "lm"}, model), "croc": build_objective(croc_cfg, model)}
    optimizers = {k: torch.optim.AdamW(param_groups(model, stage, o)) for k, o in objectives.items()}
    times = {"caption": [], "croc": [], "matching": [], "mask": []}
    for r in range(args.repeats + 1):  # the first round warms up and is not counted
        for name in ("caption", "croc"):
            dt = timed_step(model, objectives[name], optimizers[name], batch)
            if r:
                times[name].append(dt)
                if name == "croc":
                    times["matching"].append(objectives["croc"].timings["matching"])
                    times["mask"].append(objectives["croc"].timings["mask"])
    med = {k: statistics.median(v) for k, v in times.items()}
    n_img = batch["pixel_values"].shape[0]
    result = {
        "benchmark": "croc_overhead",
        "smoke": args.smoke,
        "batch_size": args.batch_size,
        "images": n_img,
        "seq_len": int(batch["input_ids"].shape[1]),
        "visual_tokens_per_image": model.num_image_tokens,
        "pool_size": args.pool_size,
        "matching": args.matching,
        "attention": args.attention,
        "lm": args.lm,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "caption_step_s": round(med["caption"], 4),
        "croc_step_s": round(med["croc"], 4),
        "croc_matching_s": round(med["matching"], 5),
        "croc_mask_s": round(med["mask"], 5),
        "croc_rest_s": round(med["croc"] - med["matching"] - med["mask"], 4),
        "matching_fraction": round(med["matching"] / med["croc"], 5),
        "mask_fraction": round(med["mask"] / med["croc"], 5),
        "croc_over_caption": round(med["croc"] / med["caption"], 3),
    }
    print(
        f"caption step {med['caption']:.3f} s | croc step {med['croc']:.3f} s = matching {med['matching'] * 1e3:.2f} ms"
        f" + mask {med['mask'] * 1e3:.2f} ms + rest {result['croc_rest_s']:.3f} s "
        f"(matching {100 * result['matching_fraction']:.2f} % of the step)"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
