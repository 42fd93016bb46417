"""Does Croc's comprehension stage help? Two runs of the `croc` recipe with the same total number
of steps: stage 1.5 trains with the Croc objective in one ("croc") and with plain next-token
training on the same detailed captions in the other ("caption_only"); everything else (data, parts
that train, learning rates, seeds) is identical. Both are scored on the held-out test split: VQA
accuracy, grounding Acc@0.5 and caption CIDEr, next to chance / majority baselines.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/croc_ablation.py --align-steps 10 --mid-steps 16 \
        --instruct-steps 48 --eval-caption 30 --eval-vqa 100 --eval-grounding 50

Defaults are the recipe's full size (about 20 minutes of training per arm on 2 free cores). An
interrupted run continues with --resume (same arguments). The last line printed is one JSON object
with both arms' figures; `train_seconds` counts only the last (resumed) part of an arm's training.
`--smoke` runs both arms at toy size (tiny models and world, one step per stage) in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mmbridge.config import load_recipe  # noqa: E402
from mmbridge.data.llava import read_llava_json  # noqa: E402
from mmbridge.data.sources import resolve_source  # noqa: E402
from mmbridge.demo import baselines  # noqa: E402
from mmbridge.eval.evaluate import evaluate_records  # noqa: E402
from mmbridge.train.trainer import Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tiny_models, tiny_sets, tiny_world  # noqa: E402

SMOKE_KEYS = ("benchmark", "croc", "caption_only", "croc_minus_caption_only", "baselines")  # the last JSON line's
KEYS = {"caption": ["cider", "bleu4"], "vqa": ["vqa_accuracy"], "grounding": ["grounding_acc50", "unparsed"]}


def overrides(args, arm: str) -> list[str]:
    out = [
        f"stages.0.steps={args.align_steps}",
        f"stages.1.steps={args.mid_steps}",
        f"stages.2.steps={args.instruct_steps}",
        f"eval.caption.limit={args.eval_caption}",
        f"eval.vqa.limit={args.eval_vqa}",
        f"eval.grounding.limit={args.eval_grounding}",
    ]
    if args.batch_size:
        out += [f"stages.1.batch_size={args.batch_size}", f"stages.2.batch_size={args.batch_size}"]
    if arm == "caption_only":
        out.append("stages.1.objective={name: lm}")
    return out + list(args.set)


def run_arm(args, arm: str) -> dict:
    """Train one arm (or, with --resume, reuse its result / continue its checkpoint) and score it."""
    recipe = load_recipe(args.recipe, overrides(args, arm))
    run_dir = Path(args.out) / arm
    done = run_dir / "ablation_result.json"
    if args.resume and done.exists():
        result = json.loads(done.read_text())
        print(f"{arm} (earlier result): {json.dumps(result)}", flush=True)
        return result
    if not args.resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    trainer = Trainer(recipe, run_dir, resume=args.resume, progress=False)
    trainer.run()
    if trainer.stopped:  # a signal ended training early: never score a half-trained arm
        raise SystemExit(f"{arm}: training was stopped before the end; rerun with --resume to continue")
    result = {"train_seconds": round(time.time() - t0, 1)}
    for ev in recipe.eval.values():
        src = resolve_source(recipe, ev.json)
        records = read_llava_json(src.json)[0][: ev.limit or None]
        m, _ = evaluate_records(
            trainer.model,
            trainer.processor,
            records,
            src.images,
            ev.task,
            max_new_tokens=ev.max_new_tokens,
            progress=False,
        )
        result.update({k: m[k] for k in KEYS[ev.task]})
        result[f"n_{ev.task}"] = m["n"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mid = [r for r in rows if r["stage"] == recipe.stages[1].name]
    result["stage15_last_loss"] = {k: v for k, v in mid[-1].items() if k.startswith("loss")} if mid else {}
    result["final_loss"] = rows[-1]["loss"] if rows else None
    result["total_seconds"] = round(time.time() - t0, 1)
    done.write_text(json.dumps(result) + "\n")
    print(f"{arm}: {json.dumps(result)}", flush=True)
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="croc")
    ap.add_argument("--align-steps", type=int, default=20)
    ap.add_argument("--mid-steps", type=int, default=50, help="stage 1.5 steps (Croc, or plain captioning)")
    ap.add_argument("--instruct-steps", type=int, default=130)
    ap.add_argument("--batch-size", type=int, default=None, help="stage 1.5 and 2 batch size (default: the recipe's)")
    ap.add_argument("--eval-caption", type=int, default=100)
    ap.add_argument("--eval-vqa", type=int, default=400)
    ap.add_argument("--eval-grounding", type=int, default=200)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe override")
    ap.add_argument("--out", default="runs/croc-ablation")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse finished arms in --out and continue interrupted ones from their checkpoints",
    )
    ap.add_argument("--smoke", action="store_true", help="toy sizes: tiny models and world, one step per stage")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.set = [*tiny_sets(tiny_models(tmp), tiny_world(tmp)), *args.set]
            args.align_steps = args.mid_steps = args.instruct_steps = 1
            args.eval_caption = args.eval_vqa = args.eval_grounding = 2
            args.batch_size, args.out = 4, str(Path(tmp) / "runs")
        return run(args)


def run(args) -> dict:
    arms = {arm: run_arm(args, arm) for arm in ("croc", "caption_only")}
    recipe = load_recipe(args.recipe, overrides(args, "croc"))
    metrics = ("vqa_accuracy", "grounding_acc50", "cider")
    result = {
        "benchmark": "croc_ablation",
        "smoke": args.smoke,
        "steps": {"align": args.align_steps, "stage15": args.mid_steps, "instruct": args.instruct_steps},
        "eval_limits": {"caption": args.eval_caption, "vqa": args.eval_vqa, "grounding": args.eval_grounding},
        **arms,
        "croc_minus_caption_only": {k: round(arms["croc"][k] - arms["caption_only"][k], 4) for k in metrics},
        "baselines": baselines(recipe),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
