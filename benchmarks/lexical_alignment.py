"""Does the lexical alignment make a continuous bridge readable sooner? Whole runs with and without it.

    python benchmarks/lexical_alignment.py --steps 60 120 240            # growth curve on the shapes world
    python benchmarks/lexical_alignment.py --data digits --steps 120     # scikit-learn's handwritten digits
    python benchmarks/lexical_alignment.py --smoke                       # tiny models, one step per stage

Each (steps, arm) is a whole run of the bundled demo recipe (the lexical alignment) with `stages.1.steps` set (its own warmup and
cosine schedule): arm `lexical` as bundled (a `lexical` stage on captions, no LM pass, then the LM stage with the
bridge frozen); arm `plain` without that stage: the same projector with GELU, trained in the LM stage beside the
LoRA (LLaVA's way when no alignment stage is run). Same seed, data, LM steps and batch size; the `lexical` arm
also pays its alignment stage (encoder and bridge only), whose time is shown.

`--data digits` runs the same recipe, hyperparameters unchanged, on data the shapes world did not make: the
1,797 8×8 handwritten digits scikit-learn ships (UCI), scaled to the world's 256 px, 1,200 for training and 597
held out, with a caption ("a handwritten digit seven.") and three questions each (which digit; even or odd;
larger than four), scored per question type beside the majority answer of the training split.

Prints one table, then every run's figures as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tiny_models, tiny_sets, tiny_world, toy_stages  # noqa: E402

SMOKE_KEYS = ("benchmark", "data", "runs")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def arm_overrides(arm: str, recipe) -> list[str]:
    """Recipe overrides for an arm: `plain` drops the lexical stage and trains the bridge in the LM stage."""
    if arm == "lexical":
        return []
    lm_stage = recipe.stages[1]
    lr = {**lm_stage.lr, "bridge": lm_stage.lr.get("lm", 1e-3)}
    return [
        "model.bridge.act=gelu",
        "stages.0.steps=0",
        "stages.1.train.bridge=full",
        "stages.1.lr={" + ", ".join(f"{k}: {v}" for k, v in lr.items()) + "}",
    ]


def digits_set(folder: Path, size: int = 256) -> dict:
    """scikit-learn's digits as LLaVA JSON (caption, vqa) in `folder`; returns the recipe's sources."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.target))
    splits = {"train": order[:1200], "test": order[1200:]}
    sources = {}
    for split, idx in splits.items():
        caption, vqa = [], []
        for i in idx:
            pixels = (255 - digits.images[i] * (255 / 16)).astype(np.uint8)  # dark ink on white, as written
            name = f"{split}_{i:04d}.png"
            Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB").save(folder / "images" / name)
            d = int(digits.target[i])

            def ask(q, a, t, name=name):
                return {
                    "id": f"{name}_{t}",
                    "image": name,
                    "qtype": t,
                    "answer": a,
                    "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
                }

            caption.append(
                {
                    "id": name,
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": "<image>\nDescribe the picture."},
                        {"from": "gpt", "value": f"a handwritten digit {WORDS[d]}."},
                    ],
                }
            )
            vqa += [
                ask("Which digit is this?", WORDS[d], "digit"),
                ask("Is the digit even?", "yes" if d % 2 == 0 else "no", "even"),
                ask("Is the digit larger than four?", "yes" if d > 4 else "no", "larger"),
            ]
        for task, records in (("caption", caption), ("vqa", vqa)):
            (folder / f"{split}_{task}.json").write_text(json.dumps(records))
            sources[f"digits_{split}_{task}"] = {
                "json": str(folder / f"{split}_{task}.json"),
                "images": str(folder / "images"),
            }
    return sources


def digits_overrides(sources: dict) -> list[str]:
    """The lexical recipe on the digits: captions align, captions and questions train the LM."""
    src = "{" + ", ".join(f"{k}: {{json: {v['json']}, images: {v['images']}}}" for k, v in sources.items()) + "}"
    return [
        f"sources={src}",
        "stages.0.data={digits_train_caption: 1.0}",
        "stages.1.data={digits_train_caption: 0.5, digits_train_vqa: 2.0}",
        "eval={}",
    ]


def evaluate(trainer, recipe, data: str, limits: dict) -> dict:
    """Held-out figures: the world's caption/VQA/grounding, or the digits' VQA by type beside its majority."""
    from mmbridge.data.llava import read_llava_json
    from mmbridge.data.sources import resolve_source
    from mmbridge.eval.evaluate import evaluate_records
    from mmbridge.eval.metrics import vqa_accuracy_by_type

    out = {}
    tasks = {"caption": "caption", "vqa": "vqa", "grounding": "grounding"} if data == "world" else {"vqa": "vqa"}
    for task in tasks:
        name = f"world/test/{task}" if data == "world" else f"digits_test_{task}"
        src = resolve_source(recipe, name)
        records = read_llava_json(src.json)[0][: limits.get(task) or None]
        m, rows = evaluate_records(
            trainer.model, trainer.processor, records, src.images, task, max_new_tokens=24 if task != "vqa" else 8
        )
        out.update({k: round(m[k], 4) for k in ("cider", "vqa_accuracy", "grounding_acc50", "unparsed") if k in m})
        if task == "vqa":
            out["vqa_by_type"] = vqa_accuracy_by_type(
                [r["prediction"] for r in rows], [r["gold"] for r in rows], [rec.get("qtype") for rec in records]
            )
            if data == "digits":
                train = read_llava_json(resolve_source(recipe, "digits_train_vqa").json)[0]
                by_type = defaultdict(Counter)
                for r in train:
                    by_type[r["qtype"]][r["answer"]] += 1
                major = {t: c.most_common(1)[0][0] for t, c in by_type.items()}
                out["majority_by_type"] = {
                    t: round(
                        sum(r["answer"] == major[t] for r in records if r["qtype"] == t)
                        / max(1, sum(r["qtype"] == t for r in records)),
                        4,
                    )
                    for t in major
                }
    return out


def run(recipe_name: str, overrides: list[str], out: Path, data: str, limits: dict) -> dict:
    from mmbridge.config import load_recipe
    from mmbridge.train.trainer import Trainer

    recipe = load_recipe(recipe_name, overrides)
    recipe.stages = [s for s in recipe.stages if s.steps != 0]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    trainer = Trainer(recipe, out)
    trainer.run()
    train_s = time.time() - t0
    figures = evaluate(trainer, recipe, data, limits)
    return {**figures, "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("world", "digits"), default="world")
    ap.add_argument("--steps", type=int, nargs="+", default=[60, 120, 240], help="LM-stage step counts")
    ap.add_argument("--arms", nargs="+", default=["lexical", "plain"], choices=("lexical", "plain"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    ap.add_argument("--out", default="runs/lexical")
    ap.add_argument("--smoke", action="store_true", help="tiny models and world, one step per stage")
    args = ap.parse_args()
    from mmbridge.config import load_recipe

    limits = {"caption": 50, "vqa": 200, "grounding": 100}
    with tempfile.TemporaryDirectory() as tmp:
        base = list(args.set)
        if args.data == "digits":
            base = digits_overrides(digits_set(Path(tmp) / "digits")) + base
        if args.smoke:
            base = [
                *tiny_sets(tiny_models(tmp), tiny_world(tmp)),
                *toy_stages("demo", steps=1),
                "model.vision.image_size=32",
                *base,
            ]
            args.steps, args.out, limits = [1], str(Path(tmp) / "runs"), {"caption": 2, "vqa": 6, "grounding": 2}
        recipe = load_recipe("demo", base)
        rows = {}
        for n in args.steps:
            for arm in args.arms:
                sets = [*base, *arm_overrides(arm, recipe), f"stages.1.steps={n}"]
                rows[f"{arm}@{n}"] = run("demo", sets, Path(args.out) / f"{args.data}-{arm}-{n}", args.data, limits)
                print(json.dumps({f"{arm}@{n}": rows[f"{arm}@{n}"]}), flush=True)
    cols = (
        ("vqa_accuracy", "cider", "grounding_acc50", "train_seconds")
        if args.data == "world"
        else ("vqa_accuracy", "train_seconds")
    )
    print(f"\n{'arm@steps':>14} | " + " | ".join(cols) + " | VQA by type")
    for key, r in rows.items():
        print(f"{key:>14} | " + " | ".join(str(r.get(c, "")) for c in cols) + f" | {r.get('vqa_by_type')}")
    print(json.dumps({"benchmark": "lexical_alignment", "data": args.data, "smoke": args.smoke, "runs": rows}))


if __name__ == "__main__":
    main()
