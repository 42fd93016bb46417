"""LaVIN's mixture-of-modality adapters: identity at initialisation, routing by modality, what trains, reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mmbridge.config import RecipeError, recipe_from_dict
from mmbridge.core import IGNORE
from mmbridge.interop.export import ExportError, export_run
from mmbridge.models.mma import ModalityAdapter, add_mma, mark
from mmbridge.runs import load_run
from mmbridge.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict

CONV = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]
TEXT = [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "red"}]


def adapters(model):
    return [m for m in model.lm.modules() if isinstance(m, ModalityAdapter)]


def test_at_initialisation_the_adapted_lm_equals_the_plain_one(tiny):
    model, proc = tiny
    ids = torch.tensor([proc.encode(CONV, 1).input_ids])
    pixels = torch.randn(1, 3, 32, 32)
    text_ids = torch.tensor([proc.encode(TEXT, 0).input_ids])
    adapted = copy.deepcopy(model)
    assert add_mma(adapted.lm, dim=4) == 2  # 2 layers × attention (LaVIN's default)
    assert add_mma(copy.deepcopy(model).lm, dim=4, where=("attention", "ffn")) == 2 * 2
    with torch.no_grad():
        for want_ids, px in ((ids, pixels), (text_ids, None)):
            want = model(want_ids, pixel_values=px).hidden_states
            got = adapted(want_ids, pixel_values=px).hidden_states
            assert torch.equal(want, got)


def test_text_only_and_image_text_inputs_get_different_router_weights(tiny):
    model, proc = tiny
    adapted = copy.deepcopy(model)
    add_mma(adapted.lm, dim=4)
    first = adapters(adapted)[0]
    is_image = torch.tensor([[False, True, True, False], [False, False, False, False]])
    mark(adapted.lm, is_image)
    w = first.weights(torch.zeros(2, 4, 64))
    assert w.shape == (2, 1, 2) and torch.allclose(w.sum(-1), torch.ones(2, 1))
    assert not torch.allclose(w[0], w[1])
    # packed rows: each sample's own modality (sample 1 holds the image, sample 2 is text only)
    segments = torch.tensor([[1, 1, 1, 2], [1, 1, 2, 2]])
    mark(adapted.lm, is_image, segments)
    w = first.weights(torch.zeros(2, 4, 64))
    image_w, text_w = w[0, 0], w[1, 0]
    assert not torch.allclose(image_w, text_w)
    for row, pos, want in ((0, 2, image_w), (0, 3, text_w), (1, 1, text_w), (1, 3, text_w)):
        torch.testing.assert_close(w[row, pos], want)


def mma_recipe(tiny_lm_dir, tiny_clip_dir, world, **mma):
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["stages"][1].update(
        train={"bridge": "full", "lm": "mma"}, lr={"bridge": 1e-2, "lm": 1e-2}, mma={"dim": 4, **mma}
    )
    return recipe_from_dict(data)


def test_mma_stage_trains_only_adapters_and_reloads(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    trainer = Trainer(mma_recipe(tiny_lm_dir, tiny_clip_dir, world), tmp_path / "run", progress=False)
    trainer.run()
    model = trainer.model.eval()
    lm_trained = {n for n, p in model.lm.named_parameters() if p.requires_grad}
    assert lm_trained and all(
        "layernorm.down." in n or "layernorm.up." in n or "layernorm.router." in n or n.startswith("mma_modality.")
        for n in lm_trained
    )
    assert all(p.abs().sum() > 0 for a in adapters(model) for p in a.up.parameters())  # left their zero start
    n_adapter = sum(p.numel() for n, p in model.lm.named_parameters() if n in lm_trained)
    # per layer (attention only): a shared down 64x4 + 4, two grouped ups (2 groups: 64 x 2) + 64, a router 64x2 + 2
    assert n_adapter == 2 * ((64 * 4 + 4) + 2 * (64 * 2 + 64) + (64 * 2 + 2)) + 2 * 64
    ids = torch.tensor([trainer.processor.encode(CONV, 1).input_ids])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(ids, pixel_values=pixels).hidden_states
        loaded, _ = load_run(tmp_path / "run")
        got = loaded(ids, pixel_values=pixels).hidden_states
        assert torch.equal(want, got)
        text = torch.tensor([trainer.processor.encode(TEXT, 0).input_ids])
        assert torch.equal(model(text).hidden_states, loaded(text).hidden_states)
    with pytest.raises(ExportError, match="LaVIN adapters"):
        export_run(tmp_path / "run", tmp_path / "export")


def test_mma_recipe_errors(tiny_lm_dir, tiny_clip_dir, world):
    with pytest.raises(RecipeError, match="mma.where"):
        mma_recipe(tiny_lm_dir, tiny_clip_dir, world, where=["everywhere"])
    with pytest.raises(RecipeError, match="temperature"):
        mma_recipe(tiny_lm_dir, tiny_clip_dir, world, temperature=0)


def test_mixture_of_modality_training_mixes_text_only_and_image_samples_in_a_batch(
    tiny_lm_dir, tiny_clip_dir, world, tmp_path
):
    text = [
        {
            "id": f"t{i}",
            "conversations": [{"from": "human", "value": f"Say the number {i}."}, {"from": "gpt", "value": str(i)}],
        }
        for i in range(20)
    ]
    (tmp_path / "text.json").write_text(json.dumps(text))
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["sources"] = {"text": {"json": str(tmp_path / "text.json")}}
    data["stages"] = [
        dict(
            data["stages"][1],
            data={"text": 1.0, "world/train/vqa": 1.0},
            steps=4,
            batch_size=8,
            train={"bridge": "full", "lm": "mma"},
            lr={"bridge": 1e-2, "lm": 1e-2},
            mma={"dim": 4},
        )
    ]
    trainer = Trainer(recipe_from_dict(data), tmp_path / "run", progress=False)
    seen = []

    def record(module, args, kwargs):  # the decoder stays the same module; its layers get the adapters
        seen.append(sorted(set(trainer.model.lm.mma_modality.current.flatten().tolist())))

    trainer.model.lm.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    trainer.run()
    assert seen and all(s == [0, 1] for s in seen)  # every batch held both kinds of sample
    first = adapters(trainer.model)[0]
    mark(trainer.model.lm, torch.tensor([[True], [False]]))
    w = first.weights(torch.zeros(2, 1, 64))
    assert not torch.allclose(w[0], w[1])


def lavin_by_hand(adapter, h, w):
    """LaVIN's RepAdapter router written out per token: a = A h + a_b (no activation; dropout off in eval); each
    up-projection is a Conv1d(dim, d, 1, groups=2), i.e. output i reads the input block of i's group;
    out = h + s (w_0 B a + w_1 D a)."""
    d, dim = adapter.down.in_features, adapter.down.out_features
    g = adapter.up[0].groups
    out = torch.empty_like(h)
    for t in range(h.shape[0]):
        a = [sum(adapter.down.weight[j, k] * h[t, k] for k in range(d)) + adapter.down.bias[j] for j in range(dim)]
        for i in range(d):
            block = i // (d // g)  # the group output i belongs to
            ins = range(block * dim // g, (block + 1) * dim // g)
            ups = [sum(up.weight[i, j - block * dim // g] * a[j] for j in ins) + up.bias[i] for up in adapter.up]
            out[t, i] = h[t, i] + adapter.scale * (w[0] * ups[0] + w[1] * ups[1])
    return out


def test_the_adapter_is_lavins_repadapter_router_and_folds_into_one_matrix(tiny):
    model, _ = tiny
    lm = copy.deepcopy(model.lm)
    add_mma(lm, dim=4)
    adapter = [m for m in lm.modules() if isinstance(m, ModalityAdapter)][0].eval()
    assert adapter.dropout.p == 0.1 and not hasattr(adapter.down, "__len__")  # one shared down-projection
    torch.manual_seed(0)
    with torch.no_grad():
        for up in adapter.up:  # leave the zero start, so the paths differ
            up.weight.normal_()
            up.bias.normal_()
        x = torch.randn(1, 3, 64)
        mark(lm, torch.tensor([[True, False, False]]))
        got = adapter(x)[0]
        w = adapter.weights(x)[0, 0]
        h = adapter.norm(x)[0]
        want = lavin_by_hand(adapter, h, w)
        # each output sums 64 + 2 products and two paths: a few fp32 roundings of that many terms
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=4 * 70 * 2**-24 * scale)
        m, c = adapter.folded(w)  # no activation: one linear map per modality
        torch.testing.assert_close(h @ m.T + c, got, rtol=0, atol=4 * 70 * 2**-24 * scale)
    adapter.train()  # dropout acts on the down-projection's output while training
    torch.manual_seed(1)
    assert not torch.equal(adapter(x), adapter(x))


# -- LaVIN's "Image: N/A" prefix (model.modality_prefix) -------------------------------------------------------------


@pytest.fixture(scope="module")
def prefixed(tiny_lm_dir, tiny_clip_dir):
    """The `tiny` composite's processor with LaVIN's modality prefix on."""
    from mmbridge.config import ModelConfig
    from mmbridge.models.build import build_model

    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge={"name": "pool_adapter", "pooled": 2},
        lm={"path": tiny_lm_dir},
        max_length=128,
        system_prompt="",
        modality_prefix=True,
    )
    return build_model(cfg)[1]


def labelled(enc):
    return [(k, i) for k, (i, lab) in enumerate(zip(enc.input_ids, enc.labels)) if lab != IGNORE]


def test_modality_prefix_puts_image_n_a_before_text_only_samples_and_image_before_images(tiny, prefixed):
    _, plain = tiny
    assert prefixed.modality_prefix and not plain.modality_prefix  # off by default
    tok, image = plain.tokenizer, "<image>" * plain.num_image_tokens
    for conv, n in ((TEXT, 0), (CONV, 1)):
        with_prefix, without = prefixed.encode(conv, n), plain.encode(conv, n)
        text, plain_text = tok.decode(with_prefix.input_ids), tok.decode(without.input_ids)
        if n:  # LaVIN: "Image: " and then the image's tokens; no "N/A" where there is an image
            assert f"Image: {image}\nWhat colour" in text and "N/A" not in text
            assert text == plain_text.replace(image, f"Image: {image}", 1)
        else:
            assert "Image: N/A\nName a colour." in text and text == plain_text.replace("Name a", "Image: N/A\nName a")
        # the prefix is user text: the same answer tokens are labelled, shifted by the prefix's length
        shift = len(with_prefix.input_ids) - len(without.input_ids)
        assert shift > 0 and [(k + shift, i) for k, i in labelled(without)] == labelled(with_prefix)
        assert tok.decode([i for _, i in labelled(with_prefix)]).startswith("red")
        # generation reads the same text: the prompt is the training ids up to the assistant's reply
        prompt = prefixed.encode_prompt(conv[:1])
        assert with_prefix.input_ids[: len(prompt)] == prompt and labelled(with_prefix)[0][0] >= len(prompt)
        # and the fast length count agrees with the encoding
        assert prefixed.measure_many([(conv, n, "sample")]) == [(len(with_prefix.input_ids), False)]


def test_modality_prefix_places(prefixed):
    """One "Image: " per run of placeholders (a video's frames are one run); "N/A" heads the first user turn."""

    def user_text(conv):
        return [m["content"] for m in prefixed.messages(conv, span=1) if m["role"] == "user"]

    two = [{"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "no"}]
    assert user_text(two) == ["Image: <image> and Image: <image>: same?"]
    frames = [{"from": "human", "value": "<image><image><image>\nWhat moves?"}, {"from": "gpt", "value": "a dot"}]
    assert user_text(frames) == ["Image: <image><image><image>\nWhat moves?"]
    turns = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi."},
        {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "Name a colour."},
    ]
    assert user_text(turns) == ["Image: N/A\nHi.", "Name a colour."]


def test_modality_prefix_is_part_of_the_data_index_key(tiny, prefixed):
    from mmbridge.data.record_index import fingerprint

    assert fingerprint(prefixed) != fingerprint(tiny[1])


def test_modality_prefix_trains_and_is_served_with_the_run(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    text = [{"id": "t0", "conversations": TEXT}, {"id": "t1", "conversations": TEXT}]
    (tmp_path / "text.json").write_text(json.dumps(text))
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["model"]["modality_prefix"] = True
    data["sources"] = {"text": {"json": str(tmp_path / "text.json")}}
    data["stages"] = [
        dict(data["stages"][1], data={"text": 1.0, "world/train/vqa": 1.0}, steps=2, train={"bridge": "full"})
    ]
    data["stages"][0].pop("lora")
    data["stages"][0]["lr"] = {"bridge": 1e-2}
    trainer = Trainer(recipe_from_dict(data), tmp_path / "run", progress=False)
    tok = trainer.processor.tokenizer
    for name, want in (("text", "Image: N/A\n"), ("world/train/vqa", "Image: <image>")):
        sample = trainer.task.dataset(name)[0]  # what training reads
        assert want in tok.decode(sample["input_ids"])
    trainer.run()
    _, processor = load_run(tmp_path / "run")  # what eval, chat and serve use
    assert processor.modality_prefix
    for conv in (TEXT, CONV):
        assert processor.encode_prompt(conv[:1]) == trainer.processor.encode_prompt(conv[:1])
