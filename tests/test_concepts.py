"""Concept tokens (bridges/concepts.py) and their multiple-instance word detectors (objectives/concepts.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmbridge.config import ModelConfig, recipe_from_dict
from mmbridge.data.processor import IGNORE
from mmbridge.models.build import build_model
from mmbridge.objectives.concepts import ConceptLoss, choose_vocabulary
from mmbridge.runs import load_run
from mmbridge.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict
from tests.rounding import assert_same_math

CONCEPTS = {"words": 6, "slots": 2, "global_token": True}


@pytest.fixture(scope="module")
def concept_model(tiny_lm_dir, tiny_clip_dir):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge={"name": "pool_adapter", "pooled": 2, "concepts": CONCEPTS},
        lm={"path": tiny_lm_dir},
        max_length=128,
        system_prompt="",
    )
    model, proc = build_model(cfg)
    model.bridge.set_vocabulary(
        [proc.tokenizer.convert_tokens_to_ids(t) for t in ("Ġred", "Ġblue", "Ġcircle", "Ġsquare", "Ġtwo", "Ġleft")]
    )
    model.vision.requires_grad_(False)
    return model.eval(), proc


def test_vocabulary_is_the_most_frequent_eligible_answer_words(tokenizer):
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ("Ġred", "Ġblue", "Ġthe", "Ġa", ",", "Ġcircle", "Ġx")}
    rows = [
        [IGNORE, ids["Ġthe"], ids["Ġred"], ids["Ġred"], ids[","]],  # a word counts once per sample
        [ids["Ġthe"], ids["Ġred"], ids["Ġcircle"], ids["Ġx"]],
        [ids["Ġthe"], ids["Ġblue"], ids["Ġcircle"], ids["Ġa"]],
        [ids["Ġthe"], ids["Ġred"], ids["Ġblue"], ids["Ġx"]],
    ]
    # "the" is in every sample (> 0.9 of them), "," is not a word, " x" and " a" are one letter
    got = choose_vocabulary(rows, tokenizer, 3, min_count=2, max_share=0.9)
    assert got == [ids["Ġred"], ids["Ġblue"], ids["Ġcircle"]]  # by samples (3, 2, 2), ties by id
    assert ids["Ġblue"] < ids["Ġcircle"]
    with pytest.raises(ValueError, match="only 3 eligible words"):
        choose_vocabulary(rows, tokenizer, 4, min_count=2)


def test_tokens_are_the_best_words_embeddings_weighted_by_their_detection(concept_model):
    model, proc = concept_model
    bridge, table = model.bridge, model.lm.get_input_embeddings().weight
    torch.manual_seed(1)
    px = torch.randn(3, 3, 32, 32)
    feats = model.vision_features(px)
    inner = bridge.inner(feats)
    regions = torch.cat([inner, inner.mean(1, keepdim=True)], 1)
    assert bridge.num_tokens == proc.num_image_tokens == (4 + 1) * 2
    words = table[bridge.word_ids]
    got = model.encode_images(px)
    for i in range(3):
        for r in range(5):
            logits = regions[i, r] @ words.T
            best = logits.topk(2)
            for s in range(2):
                want = words[best.indices[s]] * torch.sigmoid(best.values[s]) + bridge.slot_embed[r, s]
                assert_same_math(got[i, r * 2 + s], want)


def test_lm_loss_trains_the_slot_embeddings_and_not_the_detectors(concept_model):
    model, proc = concept_model
    enc = proc.encode([{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a red circle"}], 1)
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    model.zero_grad(set_to_none=True)
    out = model(ids, torch.ones_like(ids), torch.randn(1, 3, 32, 32), labels)
    out.loss.backward()
    assert model.bridge.slot_embed.grad is not None and model.bridge.slot_embed.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.bridge.inner.parameters())
    model.zero_grad(set_to_none=True)


def two_captions(proc):
    """A padded batch of two one-image caption conversations: their input ids and labels."""
    convs = [
        [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red circle on the left"}],
        [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "there are two blue squares"}],
    ]
    encs = [proc.encode(c, 1) for c in convs]
    width = max(len(e.input_ids) for e in encs)
    ids = torch.tensor([e.input_ids + [proc.pad_id] * (width - len(e.input_ids)) for e in encs])
    labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in encs])
    return ids, labels


def test_mil_loss_is_bce_of_each_images_best_region(concept_model):
    model, proc = concept_model
    bridge, table = model.bridge, model.lm.get_input_embeddings().weight
    ids, labels = two_captions(proc)
    torch.manual_seed(2)
    px = torch.randn(2, 3, 32, 32)
    out = ConceptLoss(model)(model, {"input_ids": ids, "labels": labels, "pixel_values": px})
    vocab = ["red", "blue", "circle", "square", "two", "left"]
    target = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 0]], dtype=torch.float32)  # " squares" is not " square"
    inner = bridge.inner(model.vision_features(px))
    regions = torch.cat([inner, inner.mean(1, keepdim=True)], 1)
    best = (regions @ table[bridge.word_ids].T).amax(1)
    want = F.binary_cross_entropy_with_logits(best, target)
    assert len(vocab) == len(bridge.word_ids)
    assert_same_math(out.loss, want)
    out.loss.backward()
    assert all(p.grad is not None for p in bridge.inner.parameters())
    model.zero_grad(set_to_none=True)


def test_a_concepts_stage_then_an_lm_stage_saves_and_reloads_the_vocabulary(
    tiny_lm_dir, tiny_clip_dir, world, tmp_path
):
    data = tiny_recipe_dict(
        tiny_lm_dir, tiny_clip_dir, world["root"], bridge={"name": "pool_adapter", "pooled": 2, "concepts": CONCEPTS}
    )
    data["model"]["feature_cache"] = True
    data["stages"][0].update(
        objective={"name": "concepts", "min_count": 2},
        steps=20,
        lr={"bridge": 3e-2},
        data={"world/train/detailed": 1.0},
        batch_size=8,
    )
    run = tmp_path / "run"
    Trainer(recipe_from_dict(data), run, progress=False).run()
    import json

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = [r for r in rows if r["stage"] == "align"]
    assert first[-1]["loss"] < 0.9 * first[0]["loss"]  # the detectors learn from the captions
    lm_stage = [r for r in rows if r["stage"] == "multitask"]
    assert 0 < first[0]["flops"] * 20 < lm_stage[0]["flops"]  # no LM pass counted: images only
    model, proc = load_run(run)[:2]
    trained = model.bridge.word_ids.tolist()
    words = [proc.tokenizer.decode([t]).strip() for t in trained]
    assert min(trained) >= 0 and len(set(trained)) == len(trained) and all(w.isalpha() for w in words)
    # the same choice again from the same data (resume and every rank rely on it)
    fresh = Trainer(recipe_from_dict(data), tmp_path / "again", progress=False)
    fresh.task.build()
    ds = [fresh.task.dataset("world/train/detailed")]
    loss = ConceptLoss(model, min_count=2)
    model.bridge.word_ids.fill_(-1)
    loss.read_stage_data(model, ds, proc.tokenizer)
    assert model.bridge.word_ids.tolist() == trained


def test_export_names_the_concepts_option(tiny_lm_dir, tiny_clip_dir, world):
    from mmbridge.interop.export import recipe_blockers

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"], bridge={"name": "mlp", "concepts": CONCEPTS})
    assert any(b.startswith("model.bridge.concepts") for b in recipe_blockers(recipe_from_dict(data).model))
