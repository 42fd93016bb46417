"""The lexical alignment (objectives/lexical.py): a continuous bridge's word detectors by multiple-instance learning,
its output layer started as their words' embeddings; the LM then reads the bridge's own tokens."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmbridge.config import ModelConfig, recipe_from_dict
from mmbridge.data.processor import IGNORE
from mmbridge.models.build import build_model
from mmbridge.objectives.lexical import PAD, LexicalAlignment
from mmbridge.runs import load_run
from mmbridge.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict
from tests.rounding import assert_same_math
from tests.test_concepts import two_captions

WORDS = ("Ġred", "Ġblue", "Ġcircle", "Ġsquare", "Ġtwo", "Ġleft")


class Answers:
    """A stage dataset as the objective reads it: samples whose labels are the given token ids."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def encoded(self, i):
        return {"labels": self.rows[i]}


def model_with(tiny_lm_dir, tiny_clip_dir, bridge, **extra):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge=bridge,
        lm={"path": tiny_lm_dir},
        max_length=extra.pop("max_length", 128),
        system_prompt="",
        **extra,
    )
    model, proc = build_model(cfg)
    model.vision.requires_grad_(False)
    return model, proc


def aligned(model, proc, words=6):
    """The objective after choosing WORDS (each in a different number of samples, so the order is fixed)."""
    ids = [proc.tokenizer.convert_tokens_to_ids(w) for w in WORDS]
    rows = [ids[: len(ids) - k] + [IGNORE] for k in range(len(ids))] + [[ids[0]]] * 2
    objective = LexicalAlignment(model, words=words, min_count=1, max_share=1.0)
    objective.read_stage_data(model, [Answers(rows)], proc.tokenizer)
    return objective, ids


@pytest.fixture(scope="module")
def mlp_model(tiny_lm_dir, tiny_clip_dir):
    return model_with(tiny_lm_dir, tiny_clip_dir, {"name": "mlp", "act": "sigmoid"})


def test_output_layer_starts_as_the_words_and_tokens_are_their_detection_weighted_sum(mlp_model):
    model, proc = mlp_model
    objective, ids = aligned(model, proc)
    assert objective.word_ids.tolist() == ids  # by samples: red in all, left in the fewest
    head, table = model.bridge.output_layer, model.lm.get_input_embeddings().weight
    assert torch.equal(head.weight[:, :6], table[ids].T) and not head.weight[:, 6:].any() and not head.bias.any()
    assert not head.weight.requires_grad and model.bridge.proj[0].weight.requires_grad
    torch.manual_seed(1)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.vision_features(px)
        got = model.encode_images(px)
        p = torch.sigmoid(model.bridge.proj[0](feats))[..., :6]
    # a token is the sum of the vocabulary's embeddings, each weighted by its detection probability
    want = p @ table[ids].detach()
    assert_same_math(got, want, scale=float((p[..., None] * table[ids].detach().abs()).sum(-2).max()))
    # the same values on a second call (a resumed stage finds them again)
    before = head.weight.clone()
    aligned(model, proc)
    assert torch.equal(head.weight, before)


def test_mil_loss_is_bce_of_each_images_best_token(mlp_model):
    model, proc = mlp_model
    objective, _ = aligned(model, proc)
    ids, labels = two_captions(proc)
    torch.manual_seed(2)
    px = torch.randn(2, 3, 32, 32)
    model.bridge.proj[0].weight.grad = None
    out = objective(model, {"input_ids": ids, "labels": labels, "pixel_values": px})
    # red blue circle square two left; " squares" is not " square"
    target = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 0]], dtype=torch.float32)
    best = model.bridge.proj[0](model.vision_features(px))[..., :6].amax(1)
    assert_same_math(out.loss, F.binary_cross_entropy_with_logits(best, target))
    out.loss.backward()
    assert model.bridge.proj[0].weight.grad.abs().sum() > 0 and model.bridge.output_layer.weight.grad is None


def test_a_bridge_without_hidden_units_is_aligned_through_its_tokens(tiny_lm_dir, tiny_clip_dir):
    model, proc = model_with(tiny_lm_dir, tiny_clip_dir, {"name": "resampler", "latents": 4, "depth": 1})
    objective, ids = aligned(model, proc)
    assert {n for n, _ in objective.named_parameters()} == {"scale", "offset"}
    with torch.no_grad():
        objective.scale.fill_(0.3)
        objective.offset.copy_(torch.linspace(-1, 1, 6))
    torch.manual_seed(3)
    px = torch.randn(2, 3, 32, 32)
    feats = model.vision_features(px)
    tokens = model.bridge(feats)
    table = model.lm.get_input_embeddings().weight[ids]
    want = tokens @ table.T * torch.exp(torch.tensor(0.3)) + torch.linspace(-1, 1, 6)
    got = objective.word_logits(model, px)
    assert_same_math(got, want, scale=float((tokens.abs() @ table.abs().T).max()) * 1.35 + 1)


def test_a_qformer_that_reads_no_instruction_is_aligned_through_its_tokens(tiny_lm_dir, tiny_clip_dir):
    """BLIP-2's Q-Former keeps a tokenizer for its text side, but without `instruction` it reads none."""
    model, _ = model_with(tiny_lm_dir, tiny_clip_dir, {"name": "qformer", "queries": 4})
    assert model.bridge.tokenizer is not None
    assert not LexicalAlignment(model).detects_in_hidden_units


@pytest.mark.parametrize(
    "bridge,message",
    [
        ({"name": "mlp"}, "act: sigmoid"),
        ({"name": "qformer", "queries": 4, "instruction": True}, "early-fusion bridge"),
        ({"name": "pool_adapter", "pooled": 2, "concepts": {"words": 4, "slots": 2}}, "early-fusion bridge"),
    ],
)
def test_bridges_it_cannot_align_are_named(bridge, message, tiny_lm_dir, tiny_clip_dir):
    model, _ = model_with(tiny_lm_dir, tiny_clip_dir, bridge)
    with pytest.raises(ValueError, match=message):
        LexicalAlignment(model)


def test_more_words_than_hidden_units_is_refused(mlp_model):
    model, _ = mlp_model
    with pytest.raises(ValueError, match="hidden units"):
        LexicalAlignment(model, words=model.bridge.output_layer.in_features + 1)


def test_a_lexical_stage_then_an_lm_stage(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    """The detectors learn from captions with no LM pass; the output layer holds the words until a later stage
    trains it; the run reloads as a plain mlp bridge."""
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"], bridge={"name": "mlp", "act": "sigmoid"})
    data["model"]["feature_cache"] = True
    data["stages"][0].update(
        objective={"name": "lexical", "words": 8, "min_count": 2},
        steps=20,
        lr={"bridge": 3e-2},
        data={"world/train/detailed": 1.0},
        batch_size=8,
    )
    run = tmp_path / "run"
    Trainer(recipe_from_dict(data | {"stages": data["stages"][:1]}), run, progress=False).run()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"]
    model, proc = load_run(run)[:2]
    head, table = model.bridge.output_layer, model.lm.get_input_embeddings().weight
    words = [i for i in range(head.in_features) if head.weight[:, i].any()]
    assert len(words) == 8 and words == list(range(8))
    chosen = [int((table == head.weight[:, i]).all(1).nonzero()[0]) for i in words]  # each column is a word's row
    assert all(proc.tokenizer.decode([t]).strip().isalpha() for t in chosen)
    after = tmp_path / "after"
    Trainer(recipe_from_dict(data), after, progress=False).run()
    trained = load_run(after)[0].bridge.output_layer.weight
    assert not torch.equal(trained, head.weight)  # the second stage trains the output layer too


def test_phrase_binding_matches_a_hand_computation():
    """Two sentences of two words each: each sentence's best token (highest mean log σ of its words) should hold
    them and not the other sentence's words; a row of two images and a one-word sentence are left out."""
    from mmbridge.objectives.lexical import phrase_binding

    torch.manual_seed(0)
    img, stop, words = 99, 5, torch.tensor([10, 11, 12, 13])
    per_token = torch.randn(3, 2, 4, dtype=torch.float64)  # 3 images, 2 tokens each, 4 words
    input_ids = torch.tensor([[img, img, 1, 2, 3, 4, 6, 7, 8], [img, img, img, img, 1, 2, 3, 4, 6]])
    labels = torch.tensor([[-100, -100, 10, 11, stop, 12, 13, stop, 10], [-100] * 4 + [10, 11, stop, 12, 13]])
    got = phrase_binding(per_token, {"input_ids": input_ids, "labels": labels}, img, words, torch.tensor([stop]))
    on, off = F.logsigmoid(per_token[0]), F.logsigmoid(-per_token[0])
    terms = []
    for own, other in (([0, 1], [2, 3]), ([2, 3], [0, 1])):
        scores = [sum(on[t, v] for v in own) / len(own) for t in range(2)]
        t = max(range(2), key=lambda i: scores[i])
        terms.append(-scores[t] - sum(off[t, v] for v in other) / len(other))
    want = sum(terms) / len(terms)
    assert torch.allclose(got, torch.as_tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)


def test_exclusive_adds_each_tokens_detections_beyond_one(mlp_model):
    model, proc = mlp_model
    objective, _ = aligned(model, proc)
    ids, labels = two_captions(proc)
    torch.manual_seed(2)
    px = torch.randn(2, 3, 32, 32)
    batch = {"input_ids": ids, "labels": labels, "pixel_values": px}
    plain = objective(model, batch).loss
    objective.exclusive = 0.5
    try:
        out = objective(model, batch)
    finally:
        objective.exclusive = 0.0
    p = torch.sigmoid(model.bridge.proj[0](model.vision_features(px))[..., :6])  # [images, tokens, words]
    excess = torch.tensor([max(float(p[i, t].sum()) - 1, 0.0) for i in range(2) for t in range(p.shape[1])])
    assert excess.max() > 0  # random detectors hold several words per token
    assert_same_math(out.loss, plain + 0.5 * excess.mean())


def test_under_anyres_a_bag_is_the_whole_image(tiny_lm_dir, tiny_clip_dir):
    """AnyRes: an image's tokens come from several views (a global view and tiles) and newlines; the bag is the
    whole image, so a row's logit for a word is the largest over every view's tokens, the newlines left out."""
    from PIL import Image

    from mmbridge.data.dataset import Collator
    from tests.test_anyres_model import sample

    model, proc = model_with(
        tiny_lm_dir, tiny_clip_dir, {"name": "mlp", "act": "sigmoid"}, tiling={"mode": "anyres"}, max_length=400
    )
    objective, _ = aligned(model, proc)
    rng = torch.Generator().manual_seed(4)
    answers = ("a red circle on the left", "there are two blue squares")
    items = []
    for (w, h), answer in zip(((64, 64), (32, 96)), answers):  # 2x2 and 3x1 tiles: 5 and 4 views
        pixels = torch.randint(0, 255, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()
        items.append(sample(proc, [Image.fromarray(pixels)], answer=answer))
    batch = Collator(proc)(items)
    assert batch["pixel_values"].shape[0] == 9 and bool((batch["visual_index"] < 0).any())  # newlines present
    out = objective(model, batch)
    per_view = model.bridge.proj[0](model.vision_features(batch["pixel_values"]))[..., :6]  # [views, tokens, 6]
    placed = objective.image_logits(model, batch).detach()  # [2 images, 88 slots, 6]
    assert placed.shape == (2, 88, 6)
    # 88 = 16 + 8 rows of (8 + newline); 76 = 16 + 12 rows of (4 + newline), padded by 12
    assert (placed[..., 0] == PAD).sum(1).tolist() == [8, 12 + 12]
    for image, views in ((0, slice(0, 5)), (1, slice(5, 9))):  # each view's token in the image's bag, once
        real = placed[image][placed[image, :, 0] != PAD]
        want = per_view[views].detach().reshape(-1, 6)
        assert torch.equal(real.sort(0).values, want.sort(0).values)
    best = torch.stack([per_view[:5].amax((0, 1)), per_view[5:].amax((0, 1))])
    target = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 0]], dtype=torch.float32)
    assert_same_math(out.loss, F.binary_cross_entropy_with_logits(best, target))
