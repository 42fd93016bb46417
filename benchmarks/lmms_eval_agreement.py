"""Three scores of one run on the same VQA questions, side by side: `mmbridge eval --task vqa`, lmms-eval through
`mmbridge serve` (its `openai` model), and lmms-eval with mmbridge as its model (the `lmms_eval.models` entry point).

The questions are the run's world test VQA file (or `--data`/`--images`), the first `--limit`; lmms-eval reads them
as a local task (`mmbridge.interop.lmms.task.write_task`: a `datasets` folder and a YAML, in a temporary folder) and
runs its own CLI (`python -m lmms_eval eval --include_path ...`) both ways, each in its own process, the two at
once. Reported: the three scores, how many answers of each lmms-eval way equal `mmbridge eval`'s, the first
differing answers, and seconds per way (the lmms-eval ways overlap). The last line is one JSON object.

    python benchmarks/lmms_eval_agreement.py                      # runs/demo-quick (made first if missing)
    python benchmarks/lmms_eval_agreement.py --run RUN --limit 200
    python benchmarks/lmms_eval_agreement.py --smoke              # a 1-step demo run on tiny models, 8 questions

Needs lmms-eval (`make setup` installs it; docs/guide/lmms-eval.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SMOKE_KEYS = ("benchmark", "run_dir", "n", "scores", "same_answers", "agree", "seconds")
ROOT = Path(__file__).resolve().parents[1]
TASK = "mmbridge_vqa_agreement"


def ensure_run(run_dir: Path, timeout: int) -> None:
    if (run_dir / "recipe.yaml").exists():
        return
    print(f"{run_dir}: no run there; making one with `mmbridge demo --quick --out {run_dir}`", flush=True)
    subprocess.run(
        [sys.executable, "-m", "mmbridge", "demo", "--quick", "--out", str(run_dir)], check=True, timeout=timeout
    )


def questions_of(run_dir: Path, data: str | None, images: str | None) -> tuple[str, str]:
    """The LLaVA file and image root: given, or the run's world test VQA set (written again if missing)."""
    if data:
        if not images:
            raise SystemExit("--data needs --images")
        return data, images
    from mmbridge.data.sources import resolve_source
    from mmbridge.runs import read_recipe

    src = resolve_source(read_recipe(run_dir), "world/test/vqa")
    return src.json, src.images


def entry_points_on_path(work: Path) -> list[Path]:
    """Where mmbridge's installed metadata lacks the entry point (a source tree installed before it): a folder that
    declares pyproject.toml's, for PYTHONPATH."""
    from mmbridge.interop.lmms import harness

    if any(ep.name == "mmbridge" for ep in importlib.metadata.entry_points(group=harness.ENTRY_GROUP)):
        return []
    print("mmbridge's installed metadata has no lmms_eval.models entry point: declaring it from pyproject.toml")
    return [harness.entry_point_dir(work / "entry", harness.declared_entry_points(ROOT / "pyproject.toml"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo-quick", help="the run directory (made with `mmbridge demo --quick`)")
    p.add_argument("--data", default=None, help="a LLaVA VQA file (default: the run's world test VQA set)")
    p.add_argument("--images", default=None, help="its image root")
    p.add_argument("--limit", type=int, default=100, help="the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16, help="mmbridge eval's and the plugin's batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=int, default=3600, help="seconds each lmms-eval process may take")
    p.add_argument("--smoke", action="store_true", help="a 1-step demo run on tiny models, 8 questions")
    args = p.parse_args()

    from mmbridge.eval.evaluate import evaluate_file
    from mmbridge.interop.lmms import harness
    from mmbridge.interop.lmms.task import write_task
    from mmbridge.runs import load_run

    with tempfile.TemporaryDirectory(prefix="lmms-agreement-") as tmp:
        work = Path(tmp)
        if args.smoke:
            from serve import tiny_run

            run_dir, _ = tiny_run(work)
            args.limit, args.max_new_tokens = 8, 8
        else:
            run_dir = Path(args.run)
            ensure_run(run_dir, args.timeout)
        data, images = questions_of(run_dir, args.data, args.images)

        t0 = time.perf_counter()
        model, processor = load_run(run_dir, device=args.device)
        metrics, rows = evaluate_file(
            model,
            processor,
            data,
            images,
            "vqa",
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            progress=False,
        )
        seconds = {"mmbridge_eval": round(time.perf_counter() - t0, 1)}
        del model, processor

        task_dir = work / "tasks"
        write_task(task_dir, data, images, TASK, args.limit, args.max_new_tokens)
        env = harness.base_env([ROOT, *entry_points_on_path(work)])
        env["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
        key = "agreement"
        plugin = harness.lmms_eval_argv(
            "mmbridge",
            f"run={Path(run_dir).resolve()},device={args.device}",
            task_dir,
            TASK,
            work / "plugin",
            batch_size=args.batch_size,
        )
        openai = harness.lmms_eval_argv("openai", "model=run,num_concurrent=8", task_dir, TASK, work / "serve")
        with harness.served(run_dir, key, env, work / "serve.log", device=args.device) as url:
            procs = {
                "serve": harness.start_lmms_eval(
                    openai, {**env, "OPENAI_API_BASE": url, "OPENAI_API_KEY": key}, work / "serve-eval.log", work
                ),
                "plugin": harness.start_lmms_eval(plugin, env, work / "plugin-eval.log", work),
            }
            took = harness.finish_all(procs, {n: work / f"{n}-eval.log" for n in procs}, args.timeout)
        seconds.update({f"lmms_eval_{n}": s for n, s in took.items()})
        outputs = {name: harness.read_output(work / name, TASK) for name in procs}

    predictions = [r["prediction"] for r in rows]
    scores = {"mmbridge_eval": metrics["vqa_accuracy"]}
    same, differing = {}, {}
    for name, (score, answers, _) in outputs.items():
        scores[f"lmms_eval_{name}"] = score
        got = [answers.get(i) for i in range(len(rows))]
        same[name] = sum(g == w for g, w in zip(got, predictions))
        differing[name] = [
            {"id": r["id"], "mmbridge_eval": w, "lmms_eval": g} for r, g, w in zip(rows, got, predictions) if g != w
        ][:5]
    agree = all(v == len(rows) for v in same.values()) and len(set(scores.values())) == 1

    print(f"\n{len(rows)} questions of {data}, at most {args.max_new_tokens} new tokens, greedy")
    print(f"{'':28}{'vqa_accuracy':>14}{'same answers':>15}{'seconds':>10}")
    print(f"{'mmbridge eval':28}{scores['mmbridge_eval']:>14.4f}{'-':>15}{seconds['mmbridge_eval']:>10}")
    for name, label in (("serve", "lmms-eval via serve"), ("plugin", "lmms-eval via plugin")):
        n_same = f"{same[name]}/{len(rows)}"
        print(f"{label:28}{scores[f'lmms_eval_{name}']:>14.4f}{n_same:>15}{seconds[f'lmms_eval_{name}']:>10}")
    for name, rows_off in differing.items():
        for d in rows_off:
            print(f"  {name} differs on {d['id']}: {d['lmms_eval']!r} vs mmbridge eval {d['mmbridge_eval']!r}")
    print(
        json.dumps(
            {
                "benchmark": "lmms_eval_agreement",
                "run_dir": str(run_dir),
                "data": str(data),
                "n": len(rows),
                "max_new_tokens": args.max_new_tokens,
                "scores": scores,
                "same_answers": same,
                "differing": differing,
                "agree": agree,
                "seconds": seconds,
                "smoke": args.smoke,
                "lmms_eval": importlib.metadata.version("lmms-eval"),
            }
        )
    )


if __name__ == "__main__":
    main()
