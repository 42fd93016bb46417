"""`mmbridge report`: the page of a real tiny run (trained here, evaluated by the real evaluator, examples written
by demo.write_examples), rendered by a real headless Chromium: every logged curve drawn, the example images
decoded, grounding boxes in place, a non-blank screenshot, and no request leaving the page."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmbridge.cli import main as cli
from mmbridge.config import recipe_from_dict
from mmbridge.eval.metrics import parse_box
from mmbridge.eval.report import ReportError, read_run, write_report
from mmbridge.eval.svg_plot import line_chart, thin
from tests.conftest import tiny_recipe_dict

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install -y chromium): the report is checked in a real browser",
)
# run in the page after load, into a copy of it: what the browser itself decoded and drew
PROBE = """<script>addEventListener("load", () => { const p = document.createElement("pre"); p.id = "probe";
p.textContent = JSON.stringify({images: [...document.images].map(i => i.naturalWidth),
  paths: [...document.querySelectorAll("path.series")].map(e => e.getTotalLength()),
  resources: performance.getEntriesByType("resource").map(e => e.name)}); document.body.append(p); });</script>"""
REF_GREEN, PRED_RED = (0, 200, 83), (255, 23, 68)  # the boxes' stroke colours in report.CSS


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_lm_dir, tiny_clip_dir, world):
    """A run directory as `mmbridge demo` leaves it, from the tiny models: trained, evaluated, examples."""
    from mmbridge.data.llava import read_llava_json
    from mmbridge.data.sources import resolve_source
    from mmbridge.demo import baselines, write_examples
    from mmbridge.eval.evaluate import evaluate_records
    from mmbridge.eval.metrics import vqa_accuracy_by_type
    from mmbridge.train.trainer import Trainer

    torch.manual_seed(0)
    recipe = recipe_from_dict(tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"]))
    out = tmp_path_factory.mktemp("report") / "run"
    trainer = Trainer(recipe, out, progress=False)
    trainer.run()
    metrics, examples = {}, []
    for task, keys in (
        ("caption", ["cider", "bleu4"]),
        ("vqa", ["vqa_accuracy"]),
        ("grounding", ["grounding_acc50", "unparsed"]),
    ):
        src = resolve_source(recipe, f"world/test/{task}")
        records = read_llava_json(src.json)[0][:6]
        m, rows = evaluate_records(
            trainer.model, trainer.processor, records, src.images, task, max_new_tokens=8, progress=False
        )
        metrics.update({k: m[k] for k in keys})
        if task == "vqa":
            metrics["vqa_by_qtype"] = vqa_accuracy_by_type(
                [r["prediction"] for r in rows], [r["gold"] for r in rows], [rec.get("qtype") for rec in records]
            )
        examples += [{"task": task, **r, "images_root": src.images} for r in rows[:2]]
    (out / "metrics.json").write_text(json.dumps({**metrics, "baselines": baselines(recipe)}))
    write_examples(examples, out / "examples")
    return out


def chromium(page: Path, tmp: Path, *flags: str) -> str:
    """Chromium headless on `page`, every host name unresolvable, with a fresh profile; returns stdout."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={tmp / 'profile'}",
        *flags,
        page.as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=True).stdout


def page_requests(netlog: Path) -> list[str]:
    """URLs the page (a file:// origin) asked the network stack for, from Chromium's net log; data: URIs and
    the file itself never reach it, Chromium's own background requests carry another isolation key."""
    text = netlog.read_text().rstrip()
    log = json.loads(text if text.endswith("}") else text.rstrip(",") + "]}")  # an unfinished log: close it
    return sorted(
        {
            e["params"]["url"]
            for e in log["events"]
            if "file://" in str(e.get("params", {}).get("network_isolation_key", "")) and "url" in e["params"]
        }
    )


def charts(dom: str, stage: str) -> dict[str, list[tuple[str, int]]]:
    """A stage section's charts in the DOM: title → (series name, number of points) per drawn path."""
    section = re.search(rf'<section class="stage" data-stage="{stage}">(.*?)</section>', dom, re.S).group(1)
    return {
        title: [
            (name, d.count(","))
            for name, d in re.findall(r'<path class="series" data-series="([^"]+)" d="([^"]+)"', body)
        ]
        for title, body in re.findall(r'<svg class="chart"[^>]*aria-label="([^"]+)"(.*?)</svg>', section, re.S)
    }


def expected_charts(run_dir: Path, stage: str) -> dict[str, list[tuple[str, int]]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == stage]
    keys = sorted({k for r in rows for k in r})
    count = lambda k: sum(k in r for r in rows)  # noqa: E731
    out = {
        f"{stage}: loss": [(k, count(k)) for k in ["loss"] + [k for k in keys if k.startswith("loss_")]],
        f"{stage}: learning rate": [(k, count(k)) for k in keys if k.startswith("lr_")],
        f"{stage}: throughput": [("tok_per_s", len(rows))],
    }
    if any(r.get("mfu") is not None for r in rows):
        out[f"{stage}: MFU"] = [("mfu", len(rows))]
    return out


def offline_violations(page: str) -> list[str]:
    """Anything in the page's HTML that could make a browser fetch: a URL, a src/href/url() not a data: URI."""
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', page) + re.findall(r"url\(\s*['\"]?([^'\")]+)", page)
    return re.findall(r"(?:https?:)?//[\w.-]+\.\w+", page) + [r for r in refs if not r.startswith(("data:", "#"))]


@needs_chromium
def test_the_page_renders_every_curve_example_and_box_in_chromium(run, tmp_path):
    page = write_report(run, tmp_path / "report.html")
    html_text = page.read_text()
    assert offline_violations(html_text) == []
    probed = tmp_path / "probed.html"
    probed.write_text(html_text.replace("</body>", PROBE + "</body>"))
    dom = chromium(probed, tmp_path, f"--log-net-log={tmp_path / 'net.json'}", "--dump-dom")
    for stage in ("align", "multitask"):
        assert charts(dom, stage) == expected_charts(run, stage), stage
    probe = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    examples = json.loads((run / "examples" / "examples.json").read_text())
    assert len(probe["images"]) == len(examples) == 6
    assert all(w == Image.open(run / "examples" / ex["image"]).width for w, ex in zip(probe["images"], examples))
    points = [d.count(",") for d in re.findall(r'<path class="series" data-series="[^"]+" d="([^"]+)"', dom)]
    assert len(probe["paths"]) == len(points) > 0
    assert all(length > 0 for length, n in zip(probe["paths"], points) if n > 1), "a curve of no length"
    assert probe["resources"] == [], "the page loaded resources"
    assert page_requests(tmp_path / "net.json") == [], "the page asked the network"
    refs = re.findall(
        r'<div class="example" data-task="grounding">.*?<rect class="ref" x="(\d+)" y="(\d+)" '
        r'width="(\d+)" height="(\d+)"',
        dom,
        re.S,
    )
    gold = [parse_box(str(ex["reference"])) for ex in examples if ex["task"] == "grounding"]
    assert [(int(x), int(y), int(x) + int(w), int(y) + int(h)) for x, y, w, h in refs] == gold
    shot = tmp_path / "shot.png"
    chromium(page, tmp_path, "--window-size=1440,4000", f"--screenshot={shot}")
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(1 << 24)
    assert len(colours) > 50, "the screenshot is (almost) one colour"
    assert REF_GREEN in {c for _, c in colours}, "no reference box drawn in the screenshot"


@needs_chromium
def test_a_predicted_box_is_drawn_over_the_image(run, tmp_path):
    """The tiny model answers without boxes; a trained one's answer (written into a copy) is drawn in red."""
    copy = shutil.copytree(run, tmp_path / "run")
    rows = json.loads((copy / "examples" / "examples.json").read_text())
    i = next(i for i, ex in enumerate(rows) if ex["task"] == "grounding")
    rows[i]["prediction"] = "The box is [100, 200, 600, 900]."
    (copy / "examples" / "examples.json").write_text(json.dumps(rows))
    page = write_report(copy, tmp_path / "report.html")
    dom = chromium(page, tmp_path, "--dump-dom")
    assert '<rect class="pred" x="100" y="200" width="500" height="700">' in dom.replace("></rect>", ">")
    shot = tmp_path / "shot.png"
    chromium(page, tmp_path, "--window-size=1440,4000", f"--screenshot={shot}")
    assert PRED_RED in {c for _, c in Image.open(shot).convert("RGB").getcolors(1 << 24)}


def test_a_training_only_run_gets_a_page_without_eval_or_examples(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("metrics.json", "examples"))
    page = write_report(copy).read_text()
    assert (copy / "report.html").is_file() and 'id="stages"' in page and 'id="recipe"' in page
    assert 'id="eval"' not in page and 'id="examples"' not in page and "<img" not in page
    assert page.count('<path class="series"') == len(
        re.findall(r'<path class="series"', write_report(run, tmp_path / "full.html").read_text())
    )


def test_an_older_run_with_only_examples_md_still_shows_its_examples(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "examples" / "examples.json").unlink()
    from_md, from_json = read_run(copy)["examples"], read_run(run)["examples"]
    assert [(e["task"], e["id"], e["image"], e["prediction"]) for e in from_md] == [
        (e["task"], e["id"], e["image"], e["prediction"]) for e in from_json
    ]
    assert [str(e["reference"]) for e in from_md] == [str(e["reference"]) for e in from_json]


def test_not_a_run_directory_is_refused_naming_what_is_missing(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"missing recipe\.yaml and metrics\.jsonl"):
        read_run(tmp_path / "empty")
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + "{oops\n")
    with pytest.raises(ReportError, match=r"metrics\.jsonl line 7: not JSON"):
        read_run(copy)
    with pytest.raises(SystemExit) as e:
        cli(["report", str(tmp_path / "empty")])
    assert e.value.code == 2 and "missing recipe.yaml and metrics.jsonl" in capsys.readouterr().err


def test_the_cli_writes_the_page_where_asked(run, tmp_path, capsys):
    cli(["report", str(run), "--out", str(tmp_path / "r.html")])
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert str(tmp_path / "r.html") in capsys.readouterr().out


def test_a_long_curve_is_thinned_but_keeps_its_spike_and_its_ends():
    points = [(float(i), 1.0 + (i % 7) / 100) for i in range(1, 10_001)]
    points[5000] = (5001.0, 50.0)
    kept = thin(points, 800)
    assert len(kept) <= 800 and (5001.0, 50.0) in kept and kept[0] == points[0] and kept[-1] == points[-1]
    assert [x for x, _ in kept] == sorted(x for x, _ in kept)
    svg = line_chart("long: loss", {"loss": points, "nan": [(1.0, float("nan"))]})
    assert svg.count('<path class="series"') == 1 and svg.count(" L") == len(kept) - 1
