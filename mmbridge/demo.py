"""`mmbridge demo`: the bundled pretraining recipe end to end on CPU, then a results table."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

from mmbridge.config import RecipeError, load_recipe
from mmbridge.data.llava import read_llava_json
from mmbridge.data.sources import resolve_source
from mmbridge.eval.evaluate import evaluate_records, gold
from mmbridge.eval.metrics import caption_scores, center_box_baseline, majority_vqa_baseline, vqa_accuracy_by_type
from mmbridge.eval.reliance import image_reliance

QUICK = [
    "world.n_train=200",
    "world.n_val=50",
    "world.n_test=50",
    "world.root=.cache/shapes-world-quick",
    "stages.0.steps=3",
    "stages.0.batch_size=4",
    "stages.1.steps=3",
    "stages.1.batch_size=4",
    "eval.caption.limit=8",
    "eval.vqa.limit=16",
    "eval.grounding.limit=8",
]


RELIANCE_RECORDS = 128  # VQA test records scored with their own and with a wrong image


MARKER = ".mmbridge-demo"  # written into every demo run directory: only such a directory is ever cleared


def clear_run_dir(run_dir: Path) -> None:
    """Make `run_dir` an empty demo run directory. An existing one is cleared only if a demo made it (its
    marker file is there); any other non-empty directory is refused and left exactly as it is."""
    if run_dir.exists():
        if not run_dir.is_dir():
            raise RecipeError(f"--out {run_dir}: exists and is not a directory; choose another --out")
        if any(run_dir.iterdir()) and not (run_dir / MARKER).is_file():
            raise RecipeError(
                f"--out {run_dir}: a non-empty directory that is not an earlier demo run (no {MARKER} "
                "file in it); nothing was changed. Choose a new or empty --out, or remove it yourself"
            )
        if (run_dir / MARKER).is_file():
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text(
        "a run directory written by `mmbridge demo`; the next demo with this --out replaces it\n"
    )


def baselines(recipe) -> dict:
    """Chance / majority reference points computed from the validation split."""
    out = {}
    val = lambda task: read_llava_json(resolve_source(recipe, f"world/val/{task}").json)[0]  # noqa: E731
    test = lambda task: read_llava_json(resolve_source(recipe, f"world/test/{task}").json)[0]  # noqa: E731
    by_type = defaultdict(list)
    for r in val("vqa"):
        by_type[r["qtype"]].append(r["answer"])
    tv = test("vqa")
    out["vqa_accuracy"] = majority_vqa_baseline(by_type, [r["qtype"] for r in tv], [r["answer"] for r in tv])
    out["grounding_acc50"] = center_box_baseline(
        [r["box"] for r in test("grounding")], [r["box"] for r in val("grounding")]
    )
    common = Counter(r["conversations"][-1]["value"] for r in val("caption")).most_common(1)[0][0]
    tc = test("caption")
    out["cider"] = caption_scores({r["id"]: common for r in tc}, {r["id"]: gold(r, "caption") for r in tc})["cider"]
    return out


def run_demo(
    quick: bool = False,
    out: str | None = None,
    overrides: list[str] | None = None,
    export: bool = True,
    recipe_name: str = "demo",
) -> dict:
    """Train the bundled `recipe_name` (the demo's, or another with the demo's world and eval sets, e.g.
    `objects`), evaluate it beside the baselines, write the report, and export it."""
    from mmbridge.train.trainer import Trainer

    recipe = load_recipe(recipe_name, (QUICK if quick else []) + list(overrides or []))
    run_dir = Path(out or ("runs/demo-quick" if quick else "runs/demo"))
    clear_run_dir(run_dir)
    t0 = time.time()
    trainer = Trainer(recipe, run_dir)
    trainer.run()
    if trainer.stopped:  # SIGTERM/SIGINT: a checkpoint is written; evaluating a half-trained model would mislead
        raise SystemExit(0)
    t_train = time.time() - t0
    model, processor = trainer.model, trainer.processor
    metrics, examples, checked = {}, [], []
    keys = {"caption": ["cider", "bleu4"], "vqa": ["vqa_accuracy"], "grounding": ["grounding_acc50", "unparsed"]}
    for ev in recipe.eval.values():
        src = resolve_source(recipe, ev.json)
        records = read_llava_json(src.json)[0][: ev.limit or None]
        m, rows = evaluate_records(model, processor, records, src.images, ev.task, max_new_tokens=ev.max_new_tokens)
        metrics.update({k: m[k] for k in keys[ev.task]})
        metrics[f"n_{ev.task}"] = m["n"]
        if ev.task == "vqa":  # per question type, and whether the answers depend on the image at all
            metrics["vqa_by_qtype"] = vqa_accuracy_by_type(
                [r["prediction"] for r in rows], [r["gold"] for r in rows], [rec.get("qtype") for rec in records]
            )
            reliance = image_reliance(model, processor, records[:RELIANCE_RECORDS], src.images)
            metrics["vqa_image_gain"] = round(reliance["image_gain"], 4)
        examples += [{"task": ev.task, **r, "images_root": src.images} for r in rows[:3]]
        checked.append((records[:3], src.images, ev.max_new_tokens))
    metrics["n"] = sum(metrics.pop(f"n_{t}") for t in keys if f"n_{t}" in metrics)
    trainer.log_eval(
        {k: v for k, v in metrics.items() if k != "vqa_by_qtype"}
        | {f"vqa_{k}": v for k, v in metrics.get("vqa_by_qtype", {}).items()}
    )  # TensorBoard / W&B
    metrics["train_seconds"] = round(t_train, 1)
    metrics["total_seconds"] = round(time.time() - t0, 1)
    base = baselines(recipe)
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "baselines": base}, indent=2) + "\n")
    write_examples(examples, run_dir / "examples")
    print_table(metrics, base, run_dir)
    from mmbridge.eval.report import write_report

    print(f"report: {write_report(run_dir)} (one self-contained HTML page: curves, eval, examples)")
    if export:
        metrics["export"] = export_and_check(run_dir, model, processor, checked)
        (run_dir / "metrics.json").write_text(json.dumps({**metrics, "baselines": base}, indent=2) + "\n")
    return metrics


def export_and_check(run_dir: Path, model, processor, checked: list[tuple[list[dict], Path, int]]) -> dict:
    """The run as a stock transformers folder (`mmbridge export`), and whether transformers' own `generate` gives
    the demo's example answers (the first records of each eval set). A recipe the stock classes cannot express
    is named, not exported."""
    from mmbridge.interop.check import compare_with_run, load_stock, say_rows
    from mmbridge.interop.export import ExportError, export_run

    try:
        out = export_run(run_dir, run_dir / "export")
    except ExportError as e:
        print(f"export: not exported. {e}")
        return {"exported": False, "why": str(e)}
    agree = n = 0
    stock = load_stock(out)  # once, for every eval set's examples
    for records, images, max_new_tokens in checked:
        result = compare_with_run(model, processor, out, records, images, max_new_tokens, stock)
        agree, n = agree + result["agree"], n + result["n"]
        say_rows(result)
    print(f"export: {out} (stock transformers); its generate gave the demo's answer on {agree} of {n} examples")
    return {"exported": True, "path": str(out), "agree": agree, "n": n}


def write_examples(examples: list[dict], folder: Path) -> None:
    """examples.md for reading, and the same rows as examples.json (read by `mmbridge report`)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines, rows = ["# Example predictions on the held-out test split", ""], []
    for i, ex in enumerate(examples):
        name = f"{i:02d}_{ex['task']}.png"
        shutil.copy(Path(ex["images_root"]) / ex["image"][0], folder / name)
        lines += [
            f"## {ex['task']} — {ex['id']}",
            f"![{name}]({name})",
            "",
            f"- question: {ex['question'].replace('<image>', '').strip()}",
            f"- prediction: `{ex['prediction']}`",
            f"- reference: `{ex['gold']}`",
            "",
        ]
        rows.append(
            {
                "task": ex["task"],
                "id": ex["id"],
                "image": name,
                "question": ex["question"].replace("<image>", "").strip(),
                "prediction": ex["prediction"],
                "reference": ex["gold"],
            }
        )
    (folder / "examples.md").write_text("\n".join(lines))
    (folder / "examples.json").write_text(json.dumps(rows, indent=1) + "\n")


def print_table(metrics: dict, base: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mmbridge demo — held-out test split ({run_dir})")
    for col in ("metric", "model", "baseline", "baseline kind"):
        table.add_column(col)
    kinds = {
        "cider": "most frequent val caption",
        "vqa_accuracy": "majority answer per question type",
        "grounding_acc50": "mean val box",
    }
    for key, label in (
        ("cider", "caption CIDEr"),
        ("bleu4", "caption BLEU-4"),
        ("vqa_accuracy", "VQA accuracy"),
        ("grounding_acc50", "grounding Acc@0.5"),
    ):
        if key in metrics:
            b = base.get(key)
            table.add_row(label, f"{metrics[key]:.3f}", "" if b is None else f"{b:.3f}", kinds.get(key, ""))
    if "vqa_image_gain" in metrics:
        table.add_row(
            "VQA loss, wrong image − own", f"{metrics['vqa_image_gain']:.3f}", "0.000", "a model that ignores the image"
        )
    Console().print(table)
    if metrics.get("vqa_by_qtype"):
        per_type = ", ".join(f"{k} {v:.3f}" for k, v in metrics["vqa_by_qtype"].items())
        print(f"VQA accuracy per question type: {per_type}")
    print(
        f"unparsed grounding answers: {metrics.get('unparsed', 0)}; training took {metrics['train_seconds']} s, "
        f"all {metrics['total_seconds']} s; examples in {run_dir / 'examples'}"
    )
