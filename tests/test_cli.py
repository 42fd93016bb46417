"""End to end on the real packaged weights: `demo --quick`, then `eval` and `chat` on its run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mmbridge.cli import main
from mmbridge.eval.evaluate import evaluate_records
from mmbridge.eval.metrics import caption_scores
from tests.greedy_reference import greedy_answers, vqa_accuracy_by_hand


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick demo's run, its metrics, and per task the records it evaluated and the rows it got for them."""
    from mmbridge import demo

    out = tmp_path_factory.mktemp("demo") / "run"
    scored = {}

    def keep(model, processor, records, image_root, task, **kw):
        metrics, rows = evaluate_records(model, processor, records, image_root, task, **kw)
        scored[task] = (records, rows)
        return metrics, rows

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "evaluate_records", keep)
        metrics = demo.run_demo(quick=True, out=str(out))
    return out, metrics, scored


@pytest.fixture(scope="module")
def trained(quick_run):
    """The quick run's model and processor, loaded once for the tests that decode by hand."""
    from mmbridge.runs import load_run

    return load_run(quick_run[0])


def iou(a, b):  # boxes (x0, y0, x1, y1) in continuous coordinates
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def grounding_by_hand(predictions, boxes):
    """Acc@0.5 and the unparsed count: a box is the first `[x0, y0, x1, y1]` of integers (the world's answers)."""
    found = [re.search(r"\[(\d+), (\d+), (\d+), (\d+)\]", p) for p in predictions]
    hits = [m is not None and iou([int(v) for v in m.groups()], b) >= 0.5 for m, b in zip(found, boxes)]
    return sum(hits) / len(boxes), sum(m is None for m in found)


def test_quick_demo_writes_metrics_and_examples(quick_run):
    out, metrics, scored = quick_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n"] == 8 + 16 + 8
    assert {t: len(rows) for t, (_, rows) in scored.items()} == {"caption": 8, "vqa": 16, "grounding": 8}
    for records, rows in scored.values():
        assert [r["id"] for r in rows] == [str(r["id"]) for r in records]
    # each metric is that of the predictions the demo made (the scorers are checked by hand in test_metrics)
    records, rows = scored["caption"]
    want = caption_scores(
        {r["id"]: r["prediction"] for r in rows},
        {str(r["id"]): r.get("references") or [r["conversations"][-1]["value"]] for r in records},
    )
    assert saved["cider"] == want["cider"] and saved["bleu4"] == want["bleu4"]
    records, rows = scored["vqa"]
    preds, golds = [r["prediction"] for r in rows], [r["answer"] for r in records]
    assert saved["vqa_accuracy"] == vqa_accuracy_by_hand(preds, golds)
    by_type = {}
    for p, g, r in zip(preds, golds, records):
        by_type.setdefault(r["qtype"], ([], []))[0].append(p)
        by_type[r["qtype"]][1].append(g)
    assert saved["vqa_by_qtype"] == {t: round(vqa_accuracy_by_hand(*by_type[t]), 4) for t in sorted(by_type)}
    records, rows = scored["grounding"]
    acc50, unparsed = grounding_by_hand([r["prediction"] for r in rows], [r["box"] for r in records])
    assert saved["grounding_acc50"] == acc50 and saved["unparsed"] == unparsed
    # the baselines are computed from real data: majority VQA is well above zero on this world
    assert saved["baselines"]["vqa_accuracy"] > 0.2
    assert len(list((out / "examples").glob("*.png"))) == 9
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["lexical"] * 3 + ["multitask"] * 3
    assert all(r["tokens"] > 0 and r["loss"] > 0 for r in rows)
    # the demo ends by exporting: a stock transformers folder whose generate gave the examples' answers
    assert saved["export"] == {"exported": True, "path": str(out / "export"), "agree": 9, "n": 9}
    # after 3 steps the quick run answers with its end token at once (empty answers), so this agreement checks the
    # pipeline, not the numbers: the exported weights' logits are checked against the run's in test_export.py
    assert json.loads((out / "export" / "config.json").read_text())["model_type"] == "fast_vlm"


def test_eval_command_writes_the_model_s_predictions_and_their_scores(quick_run, trained, tmp_path):
    out, _, _ = quick_run
    from mmbridge.config import load_recipe
    from mmbridge.data.images import load_image, preprocess
    from mmbridge.data.llava import read_llava_json
    from mmbridge.data.sources import resolve_source

    recipe = load_recipe(out / "recipe.yaml")
    src = resolve_source(recipe, "world/test/grounding")
    records = read_llava_json(src.json)[0][:2]
    assert records[0]["image"] != records[1]["image"]  # one batch of two prompts, none sharing an image
    main(
        [
            "eval",
            str(out),
            "--data",
            src.json,
            "--images",
            src.images,
            "--task",
            "grounding",
            "--limit",
            "2",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "m.json"),
        ]
    )
    m = json.loads((tmp_path / "m.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "m.predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records] and [r["gold"] for r in rows] == [
        r["box"] for r in records
    ]
    model, proc = trained
    prompts = [proc.encode_prompt(r["conversations"][:1]) for r in records]
    pixels = preprocess(
        [load_image(Path(src.images) / r["image"]) for r in records], proc.image_size, proc.image_mean, proc.image_std
    )
    assert [r["prediction"] for r in rows] == greedy_answers(model, proc, prompts, pixels, 24)
    acc50, unparsed = grounding_by_hand([r["prediction"] for r in rows], [r["box"] for r in records])
    assert m["n"] == 2 and m["grounding_acc50"] == acc50 and m["unparsed"] == unparsed


def test_chat_uses_the_trained_run(quick_run, trained, capsys):
    """`chat` answers with the run's trained weights: the same tokens as decoding by hand."""
    import torch

    from mmbridge.data.images import load_image, preprocess

    out, _, _ = quick_run
    image = sorted((out / "examples").glob("*.png"))[0]
    answer = main(["chat", str(out), "--image", str(image), "--max-new-tokens", "6", "How many shapes are there?"])
    assert capsys.readouterr().out.endswith(answer + "\n")  # the answer is printed last (after 3 steps, maybe "")
    model, proc = trained
    ids = proc.encode_prompt([{"from": "human", "value": "<image>\nHow many shapes are there?"}])
    pixels = preprocess([load_image(image)], proc.image_size, proc.image_mean, proc.image_std)
    eos = [proc.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    want = model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels, 6, eos)[0]
    assert answer == proc.tokenizer.decode(want, skip_special_tokens=True).strip()
