"""End to end on the real packaged weights: `demo --quick`, then `eval` and `chat` on its run."""

from __future__ import annotations

import json

import pytest

from mmbridge.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from mmbridge.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "run"
    metrics = run_demo(quick=True, out=str(out))
    return out, metrics


def test_quick_demo_writes_metrics_and_examples(quick_run):
    out, metrics = quick_run
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("cider", "bleu4", "vqa_accuracy", "grounding_acc50", "unparsed", "n"):
        assert key in saved
    assert saved["n"] == 8 + 16 + 8
    assert 0.0 <= saved["vqa_accuracy"] <= 1.0 and 0 <= saved["unparsed"] <= 8
    # the baselines are computed from real data: majority VQA is well above zero on this world
    assert saved["baselines"]["vqa_accuracy"] > 0.2
    assert len(list((out / "examples").glob("*.png"))) == 9
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["objects"] * 3 + ["multitask"] * 3
    assert all(r["tokens"] > 0 and r["loss"] > 0 for r in rows)


def test_eval_command_writes_the_documented_keys(quick_run, tmp_path):
    out, _ = quick_run
    from mmbridge.config import load_recipe
    from mmbridge.data.sources import resolve_source

    recipe = load_recipe(out / "recipe.yaml")
    src = resolve_source(recipe, "world/test/grounding")
    main(["eval", str(out), "--data", src.json, "--images", src.images, "--task", "grounding",
          "--limit", "4", "--out", str(tmp_path / "m.json")])
    m = json.loads((tmp_path / "m.json").read_text())
    assert set(m) >= {"grounding_acc50", "unparsed", "n"} and m["n"] == 4
    preds = (tmp_path / "m.predictions.jsonl").read_text().splitlines()
    assert len(preds) == 4 and "prediction" in json.loads(preds[0])


def test_chat_uses_the_trained_run(quick_run, capsys):
    """`chat` answers with the run's trained weights: the same tokens as decoding by hand."""
    import torch

    from mmbridge.data.images import load_image, preprocess
    from mmbridge.train.checkpoint import load_run

    out, _ = quick_run
    image = sorted((out / "examples").glob("*.png"))[0]
    answer = main(["chat", str(out), "--image", str(image), "--max-new-tokens", "6", "How many shapes are there?"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == answer
    model, proc = load_run(out)
    ids = proc.encode_prompt([{"from": "human", "value": "<image>\nHow many shapes are there?"}])
    pixels = preprocess([load_image(image)], proc.image_size, proc.image_mean, proc.image_std)
    eos = [proc.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    want = model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels, 6, eos)[0]
    assert answer == proc.tokenizer.decode(want, skip_special_tokens=True).strip()
