"""Answer ranking (`eval --task choice`): candidates from a record, its question type or the whole source;
scores equal to hand-computed log-likelihoods (a bigram LM built by hand) and to the training loss of each
candidate alone (the tiny composite, images included); nothing is generated or decoded."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmbridge.data.images import load_image, preprocess
from mmbridge.data.llava import read_llava_json
from mmbridge.data.processor import IGNORE
from mmbridge.eval.choice import candidate_lists, score_candidates
from mmbridge.eval.evaluate import evaluate_records, prompt_turns
from mmbridge.models.mmlm import MultimodalLM


def _boom(*args, **kwargs):
    raise AssertionError("answer ranking must not generate or decode")


@pytest.fixture
def no_decoding(monkeypatch, tiny):
    monkeypatch.setattr(MultimodalLM, "generate", _boom)
    for name in ("decode", "batch_decode"):
        monkeypatch.setattr(tiny[1].tokenizer, name, _boom)


@pytest.fixture(scope="module")
def vqa(world) -> list[dict]:
    return read_llava_json(world["manifest"]["test"]["vqa"])[0]


def test_candidates_come_from_the_record_its_question_type_or_the_source():
    def rec(i, reply, **kw):
        return {"id": i, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": reply}], **kw}

    source = [
        rec(0, "red", qtype="colour"),
        rec(1, "blue", qtype="colour"),
        rec(2, "yes", qtype="exists"),
        rec(3, "3", qtype="count"),
        rec(4, "no", qtype="exists"),
        rec(5, "red", qtype="colour"),
    ]
    records = [source[0], source[2], rec(6, "x", candidates=["b", "a", "b"]), rec(7, "3"), rec(8, "2", qtype="size")]
    assert candidate_lists(records, source) == [
        ["blue", "red"],
        ["no", "yes"],
        ["b", "a"],
        ["3", "blue", "no", "red", "yes"],
        ["3", "blue", "no", "red", "yes"],
    ]
    assert candidate_lists([rec(9, "z", answer=["z", "y"], qtype="t")]) == [["y", "z"]]  # an annotators' list
    with pytest.raises(ValueError, match="candidates"):
        candidate_lists([rec(10, "a", candidates=[])])


class BigramLM(nn.Module):
    """A hand-built LM: log p(next | token u) = log_softmax(table[u % C]); no layers, no attention, so a
    token's likelihood depends on its predecessor alone and can be computed by hand."""

    def __init__(self, table: torch.Tensor, width: int):
        super().__init__()
        classes, vocab = table.shape
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab, bias=False)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[torch.arange(vocab), torch.arange(vocab) % classes] = 1.0
            self.head.weight.zero_()
            self.head.weight[:, :classes] = table.T
        self.config = SimpleNamespace(hidden_size=width)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def get_decoder(self):
        return lambda inputs_embeds, **kwargs: SimpleNamespace(last_hidden_state=inputs_embeds)


def _by_hand(proc, record: dict, answer: str, logp: torch.Tensor) -> tuple[float, int]:
    """Σ log p(token | previous token) over the reply's labelled tokens, from the table."""
    enc = proc.encode([*prompt_turns(record), {"from": "gpt", "value": answer}], 1)
    pos = [t for t, y in enumerate(enc.labels) if y != IGNORE]
    return sum(float(logp[enc.input_ids[t - 1] % logp.shape[0], enc.input_ids[t]]) for t in pos), len(pos)


@pytest.mark.parametrize("table", ["uniform", "random"])
def test_choices_and_scores_are_the_hand_computed_likelihoods(tiny, vqa, world, no_decoding, table):
    base, proc = tiny
    vocab, width = base.lm.get_input_embeddings().weight.shape
    torch.manual_seed(3)
    logits = torch.zeros(width, vocab) if table == "uniform" else 4 * torch.randn(width, vocab)
    model = MultimodalLM(base.vision, base.bridge, BigramLM(logits, width), base.image_token_id).eval()
    records = vqa[:12] + [{**vqa[12], "candidates": ["red", "a small red circle", "top center", "no"]}]
    metrics, rows = evaluate_records(
        model, proc, records, world["images"], "choice", batch_size=5, progress=False, source=vqa
    )
    logp = torch.log_softmax(logits, dim=-1)
    correct = {"sum": 0, "mean": 0}
    for r, row in zip(records, rows):
        cands = [c["answer"] for c in row["candidates"]]
        assert cands == candidate_lists([r], vqa)[0]
        want = [_by_hand(proc, r, c, logp) for c in cands]
        for got, (s, n) in zip(row["candidates"], want):
            assert got["tokens"] == n and got["logprob"] == pytest.approx(s, rel=1e-6, abs=1e-5)
            assert got["logprob_per_token"] == pytest.approx(s / n, rel=1e-6, abs=1e-5)
            if table == "uniform":  # every token has probability 1/vocab
                assert got["logprob"] == pytest.approx(-n * math.log(vocab), rel=1e-6)
        best_sum = max(range(len(cands)), key=lambda k: want[k][0])
        best_mean = max(range(len(cands)), key=lambda k: want[k][0] / want[k][1])
        if table == "uniform":  # the fewest tokens wins the sum; the per-token scores tie: the first
            assert best_mean == 0 and want[best_sum][1] == min(n for _, n in want)
        assert (row["choice"], row["choice_per_token"]) == (cands[best_sum], cands[best_mean])
        correct["sum"] += row["choice"] == r["answer"]
        correct["mean"] += row["choice_per_token"] == r["answer"]
    assert metrics["n"] == len(records) and metrics["gold_not_a_candidate"] == 1  # "bottom center" not offered
    assert metrics["choice_accuracy"] == pytest.approx(correct["sum"] / len(records))
    assert metrics["choice_accuracy_per_token"] == pytest.approx(correct["mean"] / len(records))
    if table == "random":  # the case tells the two scorings apart
        assert any(row["choice"] != row["choice_per_token"] for row in rows)


def test_batched_scores_are_each_candidates_training_loss(tiny, vqa, world, no_decoding):
    """The tiny composite with its random bridge (the image changes the scores): every candidate scored
    alone by the training forward pass, on its own record's image; a two-turn record counts its last reply."""
    model, proc = tiny
    images = [r["image"] for r in vqa]
    pick = [0, 1, next(i for i, im in enumerate(images) if im != images[0]), 9, 30]
    records = [vqa[i] for i in pick]
    first, second = vqa[pick[2]], vqa[pick[2] + 1]
    assert first["image"] == second["image"]
    records.append(
        {
            **second,
            "id": "two_turns",
            "conversations": [
                *first["conversations"],
                {"from": "human", "value": second["conversations"][0]["value"].replace("<image>\n", "")},
                second["conversations"][1],
            ],
        }
    )
    cands = candidate_lists(records, vqa)
    got = score_candidates(model, proc, records, cands, world["images"], batch_size=7, progress=False)
    for r, options, scores in zip(records, cands, got):
        pixels = preprocess(
            [load_image(f"{world['images']}/{r['image']}")], proc.image_size, proc.image_mean, proc.image_std
        )
        prompt = len(proc.encode_prompt(prompt_turns(r)))
        for answer, (logprob, n) in zip(options, scores):
            enc = proc.encode([*prompt_turns(r), {"from": "gpt", "value": answer}], 1)
            labels = torch.tensor([y if t >= prompt else IGNORE for t, y in enumerate(enc.labels)])[None]
            with torch.no_grad():
                out = model(torch.tensor([enc.input_ids]), None, pixels, labels, normalizer=1.0)
            assert n == int(out.num_targets) and logprob == pytest.approx(-float(out.loss), rel=1e-5, abs=1e-5)
    two = got[-1][0][1]  # only the last reply: the first answer's tokens are context
    full = proc.encode([*prompt_turns(records[-1]), {"from": "gpt", "value": cands[-1][0]}], 1)
    assert two < sum(y != IGNORE for y in full.labels)


def test_eval_command_writes_accuracy_and_scores_beside_it(tiny_recipe, world, tmp_path, vqa):
    from mmbridge.cli import main
    from mmbridge.train.trainer import Trainer

    tiny_recipe.stages = tiny_recipe.stages[:1]
    tiny_recipe.stages[0].steps = 1
    Trainer(tiny_recipe, tmp_path / "run", progress=False).run()
    out = tmp_path / "m.json"
    main(
        [
            "eval",
            str(tmp_path / "run"),
            "--data",
            world["manifest"]["test"]["vqa"],
            "--images",
            world["images"],
            "--task",
            "choice",
            "--limit",
            "6",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ]
    )
    metrics = json.loads(out.read_text())
    assert (
        metrics["n"] == 6
        and 0 <= metrics["choice_accuracy"] <= 1
        and set(metrics["by_qtype"]) <= {"count", "colour", "shape", "position", "exists"}
    )
    rows = [json.loads(x) for x in out.with_suffix(".scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(r["id"]) for r in vqa[:6]]
    colours = sorted({r["answer"] for r in vqa if r["qtype"] == "colour"})  # from the whole file, not 6 records
    row = next(r for r in rows if r["qtype"] == "colour")
    assert [c["answer"] for c in row["candidates"]] == colours
    assert row["choice"] == max(row["candidates"], key=lambda c: c["logprob"])["answer"]
