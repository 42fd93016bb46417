"""`mmbridge report RUN`: one self-contained HTML page about a run directory — the recipe, its stages, loss /
learning-rate / throughput curves per stage, the evaluation beside its baselines, and example predictions with
their images (grounding boxes drawn over them). Nothing is fetched at view time: the charts are inline SVG
(`eval/svg_plot.py`) and the images data: URIs."""

from __future__ import annotations

import base64
import json
import re
import statistics
from html import escape
from pathlib import Path

import yaml

from mmbridge.eval.metrics import box_iou, parse_box
from mmbridge.eval.svg_plot import line_chart

REQUIRED = ("recipe.yaml", "metrics.jsonl")  # what `mmbridge train` writes into every run directory
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
LABELS = {
    "cider": "caption CIDEr",
    "bleu4": "caption BLEU-4",
    "vqa_accuracy": "VQA accuracy",
    "grounding_acc50": "grounding Acc@0.5",
    "mean_iou": "grounding mean IoU",
    "unparsed": "grounding answers without a box",
    "vqa_image_gain": "VQA loss, wrong image − own",
    "n": "records evaluated",
    "train_seconds": "training time (s)",
    "total_seconds": "total time (s)",
}
BASELINE_KINDS = {
    "cider": "most frequent val caption",
    "vqa_accuracy": "majority answer per question type",
    "grounding_acc50": "mean val box",
    "vqa_image_gain": "a model that ignores the image",
}
# an examples.md section as demo.write_examples writes it (runs made before examples.json existed)
_MD_EXAMPLE = re.compile(
    r"^## (\S+) — (.+?)\n!\[[^\]]*\]\(([^)]+)\)\n\n- question: (.*?)\n"
    r"- prediction: `(.*?)`\n- reference: `(.*?)`\n",
    re.M | re.S,
)


class ReportError(ValueError):
    """A run directory, or a file in it, that the report cannot read; the message names the file."""


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from e


def read_run(run_dir) -> dict:
    """The run's recipe (text and parsed), metrics.jsonl rows, metrics.json (None if absent) and examples."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"{run}: no such directory (expected a run directory from `mmbridge train` or `demo`)")
    missing = [name for name in REQUIRED if not (run / name).is_file()]
    if missing:
        raise ReportError(f"{run}: not a run directory: missing {' and '.join(missing)} (`mmbridge train` writes both)")
    text = (run / "recipe.yaml").read_text()
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ReportError(f"{run / 'recipe.yaml'}: not YAML ({e})") from e
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list):
        raise ReportError(f"{run / 'recipe.yaml'}: no 'stages' list")
    rows = []
    for i, line in enumerate((run / "metrics.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{run / 'metrics.jsonl'} line {i}: not JSON ({e.msg})") from e
        if not isinstance(row, dict) or "stage" not in row or "step" not in row:
            raise ReportError(f"{run / 'metrics.jsonl'} line {i}: no 'stage' and 'step' fields")
        rows.append(row)
    metrics = _json(run / "metrics.json") if (run / "metrics.json").is_file() else None
    return {
        "dir": run,
        "recipe_text": text,
        "recipe": recipe,
        "rows": rows,
        "metrics": metrics,
        "examples": read_examples(run / "examples"),
    }


def read_examples(folder: Path) -> list[dict]:
    """examples.json (or, for older runs, examples.md) → rows of task, id, image path, question, prediction,
    reference; [] when the run has none."""
    if (folder / "examples.json").is_file():
        rows = _json(folder / "examples.json")
        for i, row in enumerate(rows):
            lacking = [k for k in ("task", "image", "prediction", "reference") if k not in row]
            if lacking:
                raise ReportError(f"{folder / 'examples.json'} item {i}: no {', '.join(lacking)}")
    elif (folder / "examples.md").is_file():
        rows = [
            dict(zip(("task", "id", "image", "question", "prediction", "reference"), m.groups()))
            for m in _MD_EXAMPLE.finditer((folder / "examples.md").read_text())
        ]
    else:
        return []
    for row in rows:
        row["path"] = folder / row["image"]
        if not row["path"].is_file():
            raise ReportError(f"{folder}: example {row.get('id', '?')} names image {row['image']}, which is missing")
        if row["path"].suffix.lower() not in MIME:
            raise ReportError(f"{row['path']}: not an image type the page can embed ({', '.join(MIME)})")
    return rows


def data_uri(path: Path) -> str:
    return f"data:{MIME[path.suffix.lower()]};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) or "—"
    return escape(str(v)) if v is not None else "—"


def _table(head: list[str], body: list[list], cls: str = "") -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    thead = f"<thead><tr>{th}</tr></thead>" if any(head) else ""
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
    return f'<table class="{cls}">{thead}<tbody>{trs}</tbody></table>'


def _series(rows: list[dict], keys: list[str]) -> dict:
    return {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}


def stage_section(i: int, stage: dict, rows: list[dict]) -> str:
    """A stage's settings, its step statistics and its charts (loss and loss terms, lr, tokens/s, MFU)."""
    good = [r for r in rows if "skipped" not in r]
    keys = sorted({k for r in good for k in r})
    accum = stage.get("grad_accum") or 1
    batch = f"{stage.get('batch_size')}" + (f" × {accum} accumulated" if accum > 1 else "")
    median = lambda k: statistics.median(v) if (v := [r[k] for r in good if r.get(k) is not None]) else None  # noqa
    facts = [
        ["steps", _fmt(stage.get("steps") or f"{stage.get('epochs')} epochs")],
        ["logged steps", len(good)],
        ["skipped steps (non-finite)", len(rows) - len(good)],
        ["batch", escape(batch)],
        ["trains", _fmt(stage.get("train", {}))],
        ["peak lr", _fmt(stage.get("lr", {}))],
        ["objective", _fmt((stage.get("objective") or {}).get("name", "lm"))],
        ["data", _fmt(stage.get("data", {}))],
        ["last loss", _fmt(good[-1]["loss"] if good else None)],
        ["median tokens/s", _fmt(median("tok_per_s"))],
        ["median MFU", _fmt(median("mfu"))],
        ["median data time (s/step)", _fmt(median("data_s"))],
    ]
    charts = [
        line_chart(
            f"{stage['name']}: loss", _series(good, ["loss"] + [k for k in keys if k.startswith("loss_")]), "loss"
        ),
        line_chart(f"{stage['name']}: learning rate", _series(good, [k for k in keys if k.startswith("lr_")]), "lr"),
        line_chart(f"{stage['name']}: throughput", _series(good, ["tok_per_s"]), "tokens/s"),
        line_chart(f"{stage['name']}: MFU", _series(good, ["mfu"]), "MFU"),
    ]
    body = "".join(f'<figure class="plot">{c}</figure>' for c in charts if c) or "<p>No steps logged.</p>"
    return (
        f'<section class="stage" data-stage="{escape(stage["name"])}"><h3>Stage {i}: {escape(stage["name"])}'
        f'</h3>{_table(["", ""], facts, "facts")}<div class="plots">{body}</div></section>'
    )


def eval_section(metrics: dict) -> str:
    """The evaluation beside its baselines, and VQA accuracy per question type."""
    base = metrics.get("baselines") or {}
    keys = [k for k in LABELS if k in metrics] + sorted(
        k for k, v in metrics.items() if k not in LABELS and isinstance(v, (int, float))
    )
    body = [
        [
            escape(LABELS.get(k, k)),
            _fmt(metrics[k]),
            _fmt(base.get(k, 0.0 if k == "vqa_image_gain" else None)),
            escape(BASELINE_KINDS.get(k, "")),
        ]
        for k in keys
    ]
    out = '<section id="eval"><h2>Evaluation (held-out split)</h2>' + _table(
        ["metric", "model", "baseline", "baseline kind"], body, "eval"
    )
    if metrics.get("vqa_by_qtype"):
        rows = [
            [escape(t), _fmt(a), f'<span class="bar" style="width:{100 * a:.1f}%"></span>']
            for t, a in metrics["vqa_by_qtype"].items()
        ]
        out += "<h3>VQA accuracy per question type</h3>" + _table(["type", "accuracy", ""], rows, "qtype")
    return out + "</section>"


def example_card(ex: dict) -> str:
    """An example's image (data: URI) with its question, prediction and reference; for grounding, the
    reference (green) and predicted (red) boxes drawn over the image in [0, 999] coordinates."""
    overlay, note = "", ""
    if ex["task"] == "grounding":
        ref, pred = parse_box(str(ex["reference"])), parse_box(str(ex["prediction"]))
        rects = [
            f'<rect class="{cls}" x="{b[0]}" y="{b[1]}" width="{b[2] - b[0]}" height="{b[3] - b[1]}"/>'
            for cls, b in (("ref", ref), ("pred", pred))
            if b is not None
        ]
        overlay = f'<svg class="boxes" viewBox="0 0 1000 1000" preserveAspectRatio="none">{"".join(rects)}</svg>'
        note = (
            f"<li>predicted box {list(pred)}, IoU {box_iou(pred, ref):.2f}</li>"
            if pred and ref
            else "<li>no box in the prediction</li>"
            if ref
            else ""
        )
    return (
        f'<div class="example" data-task="{escape(ex["task"])}"><div class="shot"><img alt="{escape(ex["image"])}"'
        f' src="{data_uri(ex["path"])}">{overlay}</div><ul><li><b>{escape(ex["task"])}</b> '
        f"{escape(str(ex.get('id', '')))}</li><li>question: {escape(str(ex.get('question', '')))}</li>"
        f"<li>prediction: <code>{escape(str(ex['prediction']))}</code></li>"
        f"<li>reference: <code>{escape(str(ex['reference']))}</code></li>{note}</ul></div>"
    )


CSS = """body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1440px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc}h3{font-size:15px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
pre{background:#f6f6f6;padding:8px;max-height:420px;overflow:auto;font-size:12px}
.plots{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}
.chart .title{font-size:13px;font-weight:600}.chart .tick{font-size:10px;fill:#444}
.chart .frame{fill:none;stroke:#999}.chart .grid{stroke:#eee}
.chart path{fill:none;stroke-width:1.5;stroke-linejoin:round}
.bar{display:inline-block;height:10px;background:#1f77b4;min-width:1px}.qtype td:last-child{width:200px}
.examples{display:flex;flex-wrap:wrap;gap:12px}.example{width:300px;border:1px solid #ddd;padding:6px}
.example ul{padding-left:16px;margin:4px 0}.shot{position:relative;width:288px}
.shot img{display:block;width:100%;height:auto;image-rendering:pixelated}
.boxes{position:absolute;left:0;top:0;width:100%;height:100%}
.boxes rect{fill:none;stroke-width:12}.boxes .ref{stroke:#00c853}.boxes .pred{stroke:#ff1744}
code{white-space:pre-wrap;word-break:break-word}"""


def render(run: dict) -> str:
    """The page, as one HTML string."""
    recipe, rows = run["recipe"], run["rows"]
    stages = "".join(
        stage_section(i, s, [r for r in rows if r["stage"] == s.get("name")]) for i, s in enumerate(recipe["stages"], 1)
    )
    parts = [
        f"<h1>mmbridge run {escape(str(recipe.get('name', run['dir'].name)))}</h1>",
        f"<p>{escape(str(run['dir']))} · {len(recipe['stages'])} stage(s) · {len(rows)} logged steps"
        + ("" if run["metrics"] else " · no metrics.json (a training-only run)")
        + "</p>",
        f'<section id="recipe"><h2>Recipe</h2><pre>{escape(run["recipe_text"])}</pre></section>',
        f'<section id="stages"><h2>Stages</h2>{stages}</section>',
    ]
    if run["metrics"]:
        parts.append(eval_section(run["metrics"]))
    if run["examples"]:
        cards = "".join(example_card(ex) for ex in run["examples"])
        parts.append(
            f'<section id="examples"><h2>Example predictions</h2><p>Boxes: reference green, predicted '
            f'red.</p><div class="examples">{cards}</div></section>'
        )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>mmbridge report: '
        f"{escape(str(recipe.get('name', '')))}</title><style>{CSS}</style></head><body>{''.join(parts)}"
        "</body></html>\n"
    )


def write_report(run_dir, out=None) -> Path:
    """Write the page for `run_dir` to `out` (default RUN/report.html); returns its path."""
    page = render(read_run(run_dir))
    out = Path(out) if out else Path(run_dir) / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
