"""Per-token vs per-sample loss normalisation (stage option `loss_norm`)."""

from __future__ import annotations

import json

import pytest
import torch

from mmbridge.config import RecipeError, recipe_from_dict
from mmbridge.loss_norm import sample_weights, target_total
from mmbridge.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict
from tests.rounding import GRAD_REL, LOSS_REL
from tests.test_croc import build, make_batch

IGN = -100
LONG = [
    {"from": "human", "value": "<image>\nDescribe the image."},
    {"from": "gpt", "value": "a large red circle at the top left and a small blue square"},
]
SHORT = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]


def test_sample_weights_give_each_row_or_segment_a_total_of_one():
    labels = torch.tensor([[IGN, IGN, 5, 6, 7, IGN], [IGN, IGN, IGN, 9, IGN, IGN], [IGN] * 6])
    w = sample_weights(labels)
    torch.testing.assert_close(w, torch.tensor([[0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 1, 0, 0], [0.0] * 5]))
    # a packed row: segment 1 has two targets, segment 2 one, the tail is padding (segment 0)
    w = sample_weights(torch.tensor([[IGN, 3, 4, IGN, 5, IGN]]), torch.tensor([[1, 1, 1, 2, 2, 0]]))
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 0, 1, 0]]))
    batch = {"labels": labels, "target_weights": sample_weights(labels)}
    assert target_total(batch) == pytest.approx(2.0)  # two samples have targets
    assert target_total({"labels": labels}) == 4  # four target tokens


def test_sample_norm_is_the_mean_of_per_sample_means(tiny_lm_dir, tiny_clip_dir):
    """A 1-token answer and a long one: token norm weighs them by length, sample norm equally."""
    model, proc = build(tiny_lm_dir, tiny_clip_dir)
    batch = make_batch(proc, [(LONG, 1), (SHORT, 1)])
    with torch.no_grad():
        per_sample = []
        for row in range(2):
            one = {k: v[row : row + 1] for k, v in batch.items()}
            per_sample.append(model(one["input_ids"], one["attention_mask"], one["pixel_values"], one["labels"]))
        w = sample_weights(batch["labels"])
        by_sample = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["labels"],
            normalizer=2.0,
            target_weights=w,
        )
        by_token = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    (a, b) = per_sample
    assert a.num_targets > 5 * b.num_targets  # the long answer has many more tokens
    assert by_sample.loss.item() == pytest.approx((a.loss.item() + b.loss.item()) / 2, rel=1e-5)
    token_mean = (a.loss * a.num_targets + b.loss * b.num_targets).item() / float(a.num_targets + b.num_targets)
    assert by_token.loss.item() == pytest.approx(token_mean, rel=1e-5)
    assert float(by_sample.num_targets) == pytest.approx(2.0)


def test_sample_norm_with_accumulation_matches_one_big_batch(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    """loss_norm: sample normalises by the samples of all micro-batches: batch 4 == 2 x 2, and it
    differs from token norm on mixed-length tasks."""
    logs = {}
    for norm, bs, accum in (("sample", 4, 1), ("sample", 2, 2), ("token", 4, 1)):
        data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
        data["stages"] = data["stages"][1:]
        data["stages"][0].update(steps=1, batch_size=bs, grad_accum=accum, clip=1e9, loss_norm=norm)
        run = tmp_path / f"{norm}{bs}"
        Trainer(recipe_from_dict(data), run, progress=False).run()
        logs[norm, bs] = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert logs["sample", 4]["loss"] == pytest.approx(logs["sample", 2]["loss"], rel=LOSS_REL)  # sums split otherwise
    assert logs["sample", 4]["grad_norm"] == pytest.approx(logs["sample", 2]["grad_norm"], rel=GRAD_REL)
    assert abs(logs["sample", 4]["loss"] - logs["token", 4]["loss"]) > 1e-3


def test_unknown_loss_norm_is_named(tiny_lm_dir, tiny_clip_dir, world):
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["stages"][1]["loss_norm"] = "batch"
    with pytest.raises(RecipeError, match=r"stages\[1\] \(multitask\)\.loss_norm: expected token or sample"):
        recipe_from_dict(data)
