"""Croc's comprehension stage: matching, token selection, mixed attention, reconstruction, the stage."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mmbridge.config import ModelConfig, load_recipe, recipe_from_dict
from mmbridge.models.build import build_model
from mmbridge.models.masks import allowed_attention, mixed_attention_mask
from mmbridge.objectives import build_objective
from mmbridge.objectives.croc import CrocObjective, num_selected, select_tokens
from mmbridge.objectives.matching import hungarian, l2_costs, match
from mmbridge.train import trainer as trainer_module
from mmbridge.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict
from tests.rounding import assert_same_math

TWO = [
    {"from": "human", "value": "<image> and <image>: which has more shapes?"},
    {"from": "gpt", "value": "the first one"},
]
ONE = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "a red circle"}]


def build(tiny_lm_dir, tiny_clip_dir, bridge=None, drop_cls=True):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir, "drop_cls": drop_cls},
        bridge=bridge or {"name": "pool_adapter", "pooled": 2, "l2_normalize": True},
        lm={"path": tiny_lm_dir},
        max_length=160,
        system_prompt="",
    )
    return build_model(cfg)


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir, tiny_clip_dir):
    model, proc = build(tiny_lm_dir, tiny_clip_dir)
    model.bridge.requires_grad_(True)
    return model, proc


def model_width(model):
    return model.lm.get_input_embeddings().embedding_dim


def make_batch(proc, convs_and_counts, pad_extra=0):
    """Right-padded batch as the Collator makes it (optionally with extra padding columns)."""
    encs = [proc.encode(c, n) for c, n in convs_and_counts]
    ids = proc.pad([e.input_ids + [proc.pad_id] * pad_extra for e in encs], proc.pad_id)
    labels = proc.pad([e.labels + [-100] * pad_extra for e in encs], -100)
    lengths = torch.tensor([len(e.input_ids) for e in encs])
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    n_img = sum(n for _, n in convs_and_counts)
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": torch.randn(n_img, 3, 32, 32, generator=g),
    }


# -- matching -----------------------------------------------------------------------------------
def test_hungarian_equals_brute_force_and_is_one_to_one():
    g = torch.Generator().manual_seed(0)
    for m, k in [(1, 1), (2, 2), (3, 3), (2, 5), (3, 6), (4, 4), (4, 6)]:
        cost = torch.rand(3, m, k, generator=g, dtype=torch.float64)
        got = hungarian(cost)
        for b in range(3):
            assert len(set(got[b].tolist())) == m  # one-to-one
            best = min(sum(cost[b, i, j].item() for i, j in enumerate(p)) for p in itertools.permutations(range(k), m))
            assert cost[b, torch.arange(m), got[b]].sum().item() == pytest.approx(best, abs=1e-12)


def test_hungarian_needs_enough_pool_vectors(tiny):
    with pytest.raises(ValueError, match="pool holds only 3"):
        match(torch.randn(2, 5, 8), torch.randn(3, 8), "hungarian")
    assert match(torch.randn(2, 5, 8), torch.randn(3, 8), "nearest").shape == (2, 5)  # many-to-one is fine
    with pytest.raises(ValueError, match="pool holds only 2"):
        CrocObjective(tiny[0], pool_size=2)  # 3 of 4 tokens selected > 2


def test_nearest_is_argmin_of_l2_distance():
    g = torch.Generator().manual_seed(0)
    tokens, pool = torch.randn(4, 6, 16, generator=g), torch.randn(50, 16, generator=g)
    dist = ((tokens[:, :, None, :] - pool[None, None]) ** 2).sum(-1).sqrt()
    assert torch.allclose(l2_costs(tokens, pool), dist, atol=1e-5)
    assert torch.equal(match(tokens, pool, "nearest"), dist.argmin(-1))


# -- selection and replacement --------------------------------------------------------------------
def test_selected_fraction_is_exact_and_fresh_per_image():
    torch.manual_seed(0)
    for n_tokens, ratio, want in [
        (16, 0.75, 12),
        (4, 0.75, 3),
        (17, 0.75, 13),
        (64, 0.5, 32),
        (5, 1.0, 5),
        (2, 0.1, 1),
    ]:
        assert num_selected(n_tokens, ratio) == want
        sel = select_tokens(6, n_tokens, ratio)
        assert sel.shape == (6, want)
        assert all(len(set(row.tolist())) == want for row in sel)
        assert int(sel.min()) >= 0 and int(sel.max()) < n_tokens
    sel = select_tokens(8, 16, 0.75)
    assert len({tuple(r.tolist()) for r in sel}) > 1  # a fresh subset per image


@pytest.mark.parametrize("matching", ["hungarian", "nearest"])
def test_replaced_tokens_are_matched_pool_vectors(tiny, matching):
    model, proc = tiny
    obj = CrocObjective(model, pool_size=32, matching=matching)
    batch = make_batch(proc, [(ONE, 1), (TWO, 2)])
    inputs = obj.prepare(model, batch)
    img = inputs.embeds[inputs.is_image].view(3, 4, -1)
    replaced = torch.zeros(3, 4, dtype=torch.bool).scatter(1, inputs.selected, True)
    assert replaced.sum(1).tolist() == [3, 3, 3]  # exactly 75% of every image
    assert torch.equal(img[~replaced], inputs.visual[~replaced])
    assert torch.equal(img[replaced], obj.pool[inputs.assignment.flatten()])
    want = match(
        torch.nn.functional.normalize(
            inputs.visual.gather(1, inputs.selected[..., None].expand(-1, -1, inputs.visual.shape[-1])), dim=-1
        ),
        obj.pool,
        matching,
    )
    assert torch.equal(inputs.assignment, want)
    if matching == "hungarian":
        assert all(len(set(row.tolist())) == row.numel() for row in inputs.assignment)


@pytest.mark.parametrize("matching", ["hungarian", "nearest"])
def test_gradient_reaches_matched_pool_rows_only(tiny, matching):
    model, proc = tiny
    obj = CrocObjective(model, pool_size=64, matching=matching)
    batch = make_batch(proc, [(ONE, 1), (TWO, 2)])
    torch.manual_seed(3)
    inputs = obj.prepare(model, batch)
    torch.manual_seed(3)
    out = obj(model, batch, normalizer=None)
    out.loss.backward()
    nonzero = set(torch.nonzero(obj.pool.grad.abs().sum(1)).flatten().tolist())
    assert nonzero == set(inputs.assignment.flatten().tolist())
    assert set(out.terms) == {"lm", "recon"} and all(v > 0 for v in out.terms.values())


def test_reconstruction_target_is_detached(tiny):
    model, proc = tiny
    obj = CrocObjective(model, pool_size=32)
    inputs = obj.prepare(model, make_batch(proc, [(ONE, 1), (TWO, 2)]))
    assert inputs.visual.requires_grad  # so the bridge could be reached, were the target not detached
    hidden = torch.randn(*inputs.embeds.shape, requires_grad=True)
    model.bridge.zero_grad(set_to_none=True)
    obj.reconstruction_loss(hidden, inputs).backward()
    assert all(p.grad is None for p in model.bridge.parameters())
    assert hidden.grad.abs().sum() > 0 and obj.head.out.weight.grad.abs().sum() > 0
    # the target is the L2-normalised bridge output before replacement, at all or at the selected positions
    obj.eval()  # the head's dropout off: its outputs are compared across calls
    with torch.no_grad():
        pred = obj.head(hidden[inputs.is_image].view(3, 4, -1))
        target = F.normalize(inputs.visual, dim=-1)
        assert torch.allclose(obj.reconstruction_loss(hidden, inputs), F.smooth_l1_loss(pred, target, beta=0.01))
        obj.target = "selected"
        index = inputs.selected[..., None].expand(-1, -1, pred.shape[-1])
        want = F.smooth_l1_loss(pred.gather(1, index), target.gather(1, index), beta=0.01)
        assert torch.allclose(obj.reconstruction_loss(hidden, inputs), want)


# -- mixed attention ---------------------------------------------------------------------------------
def reference_allowed(attn, mode, labels, is_image, n):
    """Straightforward per-element definition of the masks."""
    b, t = attn.shape
    out = torch.zeros(b, t, t, dtype=torch.bool)
    for i in range(b):
        answers = [p for p in range(t) if labels[i, p] != -100]
        first = answers[0] if answers else t
        img_pos = [p for p in range(t) if is_image[i, p]]
        span = {p: j // n for j, p in enumerate(img_pos)}
        for q in range(t):
            for k in range(t):
                ok = k <= q
                if mode == "prefix":
                    ok = ok or (q < first and k < first)
                if mode == "visual":
                    ok = ok or (q in span and k in span and span[q] == span[k])
                out[i, q, k] = ok and bool(attn[i, k])
    return out


def test_masks_match_their_definition(tiny):
    model, proc = tiny
    batch = make_batch(
        proc, [(ONE, 1), (TWO, 2), ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], 0)], pad_extra=2
    )
    labels = batch["labels"].clone()
    labels[2] = -100  # a row without any answer: its whole (unpadded) sequence is prefix
    is_image = batch["input_ids"] == model.image_token_id
    for mode in ("causal", "prefix", "visual"):
        got = allowed_attention(batch["attention_mask"], mode, labels, is_image, 4)
        assert torch.equal(got, reference_allowed(batch["attention_mask"], mode, labels, is_image, 4)), mode
    add = mixed_attention_mask(batch["attention_mask"], "visual", labels, is_image, 4)
    assert add.shape == (3, 1, *labels.shape[1:2] * 2) and add.dtype == torch.float32
    assert set(add.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}


def hidden_under(model, embeds, mask):
    with torch.no_grad():
        return model.lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("mode", ["prefix", "visual"])
def test_mask_semantics_by_perturbation(tiny, mode):
    model, proc = tiny
    batch = make_batch(proc, [(TWO, 2), (ONE, 1)], pad_extra=3)
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    is_image = ids == model.image_token_id
    mask = mixed_attention_mask(attn, mode, labels, is_image, model.num_image_tokens)
    with torch.no_grad():
        embeds = model.embed(ids, batch["pixel_values"])
    base = hidden_under(model, embeds, mask)
    g = torch.Generator().manual_seed(0)

    def perturbed(row, pos):
        e = embeds.clone()
        e[row, pos] += 5 * torch.randn(e.shape[-1], generator=g)
        return hidden_under(model, e, mask)

    row = 0
    img = torch.nonzero(is_image[row]).flatten().tolist()  # 8 positions: image 0 then image 1
    answers = torch.nonzero(labels[row] != -100).flatten().tolist()
    # a later visual token of the same image reaches an earlier one
    h = perturbed(row, img[3])
    assert not torch.allclose(h[row, img[0]], base[row, img[0]], atol=1e-4)
    # no position ever sees a later answer token
    for pos in (answers[0], answers[len(answers) // 2], answers[-1]):
        h = perturbed(row, pos)
        assert torch.allclose(h[row, :pos], base[row, :pos], atol=1e-6), pos
        assert torch.allclose(h[1], base[1], atol=1e-6)  # nor another sample
    # padding keys are blocked
    pads = torch.nonzero(attn[1] == 0).flatten().tolist()
    h = perturbed(1, pads[0])
    real = attn[1].bool()
    assert torch.allclose(h[1, real], base[1, real], atol=1e-6)
    # text after the images, before the answer
    text = img[-1] + 2
    assert not is_image[row, text] and text < answers[0]
    h = perturbed(row, text)
    image0_changed = not torch.allclose(h[row, img[0]], base[row, img[0]], atol=1e-4)
    second_image_reaches_first = not torch.allclose(perturbed(row, img[5])[row, img[0]], base[row, img[0]], atol=1e-4)
    if mode == "visual":  # text stays causal, and each image is its own bidirectional block
        assert torch.allclose(h[row, :text], base[row, :text], atol=1e-6)
        assert not second_image_reaches_first
    else:  # Croc's prefix-LM mask: the whole prefix is bidirectional
        assert image0_changed and second_image_reaches_first


# -- generality and the stage ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bridge,drop_cls,n_tokens",
    [
        ({"name": "pool_adapter", "pooled": 2, "l2_normalize": True}, True, 4),
        ({"name": "mlp", "l2_normalize": True}, False, 17),
    ],
)
@pytest.mark.parametrize("attention", ["prefix", "visual"])
def test_any_token_count_and_two_images_per_sample(tiny_lm_dir, tiny_clip_dir, bridge, drop_cls, n_tokens, attention):
    model, proc = build(tiny_lm_dir, tiny_clip_dir, bridge, drop_cls)
    assert model.num_image_tokens == n_tokens
    obj = CrocObjective(model, pool_size=64, attention=attention)
    batch = make_batch(proc, [(TWO, 2), (ONE, 1)])
    inputs = obj.prepare(model, batch)
    assert inputs.selected.shape == (3, num_selected(n_tokens, 0.75))
    img = inputs.embeds[inputs.is_image].view(3, n_tokens, -1)
    assert int((img != inputs.visual).any(-1).sum()) == 3 * num_selected(n_tokens, 0.75)
    out = obj(model, batch, normalizer=None)
    out.loss.backward()
    assert torch.isfinite(out.loss) and obj.head.position.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.bridge.parameters())


def test_objective_options_are_checked(tiny):
    for bad in ({"matching": "greedy"}, {"attention": "full"}, {"target": "some"}, {"mask_ratio": 0.0}):
        with pytest.raises(ValueError):
            build_objective({"name": "croc", "pool_size": 32, **bad}, tiny[0])
    with pytest.raises(ValueError, match="objective croc"):
        build_objective({"name": "croc", "pool_sise": 32}, tiny[0])


def test_croc_stage_trains_pool_and_leaves_nothing_behind(tiny_lm_dir, tiny_clip_dir, world, tmp_path, monkeypatch):
    data = tiny_recipe_dict(
        tiny_lm_dir, tiny_clip_dir, world["root"], bridge={"name": "pool_adapter", "pooled": 2, "l2_normalize": True}
    )
    croc = {
        "name": "croc",
        "data": {"world/train/detailed": 1.0},
        "train": {"bridge": "full", "lm": "lora"},
        "lr": {"bridge": 1e-3, "lm": 1e-3, "objective": 1e-3},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "steps": 2,
        "batch_size": 2,
        "grad_accum": 2,
        "objective": {"name": "croc", "pool_size": 16, "attention": "visual"},
    }
    data["stages"] = [data["stages"][0], croc, data["stages"][1]]
    run = tmp_path / "run"
    trainer = Trainer(recipe_from_dict(data), run, progress=False)
    calls, built, as_built = [], [], []
    original = CrocObjective.forward
    monkeypatch.setattr(CrocObjective, "forward", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))

    def build_and_keep(cfg, model):  # keep each objective and a copy of its parameters as the trainer built them
        built.append(build_objective(cfg, model))
        as_built.append({k: p.detach().clone() for k, p in built[-1].named_parameters()})
        return built[-1]

    monkeypatch.setattr(trainer_module, "build_objective", build_and_keep)
    trainer.train_stage(0, trainer.recipe.stages[0])
    assert not calls and not list(built[0].parameters())  # nothing of Croc exists or runs outside its stage
    trainer.train_stage(1, trainer.recipe.stages[1])
    assert len(calls) == 4  # 2 steps x 2 micro-batches
    pool0 = as_built[1]["pool"]
    assert pool0.shape == (16, model_width(trainer.model))
    moved = (built[1].pool.detach() != pool0).any(-1)
    # the pool trained (lr.objective): Adam's first step moves every row that got a gradient by ~lr = 1e-3
    assert moved.any() and (built[1].pool.detach() - pool0).abs().max() > 1e-4
    trainer.train_stage(2, trainer.recipe.stages[2])
    assert len(calls) == 4 and not list(built[2].parameters())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    croc_rows = [r for r in rows if r["stage"] == "croc"]
    assert croc_rows and all(r["loss"] == pytest.approx(r["loss_lm"] + r["loss_recon"], rel=1e-5) for r in croc_rows)
    assert all("loss_recon" not in r for r in rows if r["stage"] != "croc")
    assert all("lr_objective" in r for r in croc_rows)
    saved = load_file(str(run / "model" / "model.safetensors"))
    assert not any("pool" in k or k.startswith("head.") for k in saved)  # the model carries no Croc parts


def test_bundled_croc_recipe_is_valid():
    r = load_recipe("croc")
    names = [s.name for s in r.stages]
    assert names == ["align", "croc", "instruct"]
    assert r.stages[1].objective["name"] == "croc" and r.stages[1].train["vision"] == "frozen"
    assert r.stages[0].train == {"vision": "frozen", "bridge": "full", "lm": "frozen"}
    assert "world/train/mixed" not in r.stages[2].data and r.model.bridge.get("l2_normalize")


# -- fidelity to Croc's code -----------------------------------------------------------------------------
def test_pool_rows_start_as_croc_draws_them_and_unit_is_an_option(tiny):
    model, _ = tiny
    width = model_width(model)
    torch.manual_seed(3)
    want = torch.randn(32, width)  # Croc: the pool is randn(K, d), rows of norm about sqrt(d)
    torch.manual_seed(3)
    obj = CrocObjective(model, pool_size=32)
    assert torch.equal(obj.pool.detach(), want)
    norms = obj.pool.detach().norm(dim=-1)
    # a chi distribution with d degrees of freedom: mean ~ sqrt(d), sd ~ 1/sqrt(2); 32 rows within 5 sd
    assert (norms - width**0.5).abs().max() < 5 * 2**-0.5
    torch.manual_seed(3)
    unit = CrocObjective(model, pool_size=32, pool_init="unit")
    torch.testing.assert_close(unit.pool.detach().norm(dim=-1), torch.ones(32), rtol=0, atol=width * 2**-24)
    with pytest.raises(ValueError, match="pool_init"):
        CrocObjective(model, pool_size=32, pool_init="zeros")


def bert_layer_by_hand(layer, x):
    """A post-LN BERT layer written out (eval: no dropout): per head softmax(q k^T / sqrt(d_h)) v, output dense,
    residual, LayerNorm (eps 1e-12); GELU FFN, residual, LayerNorm."""
    n, t, d = x.shape
    heads = layer.heads
    dh = d // heads

    def ln(v, norm):
        mu, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-12) * norm.weight + norm.bias

    qkv = x @ layer.qkv.weight.T + layer.qkv.bias
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    heads_out = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / dh**0.5, dim=-1)
        heads_out.append(att @ v[..., sl])
    a = torch.cat(heads_out, -1) @ layer.attn_out.weight.T + layer.attn_out.bias
    h1 = ln(x + a, layer.norm1)
    f = h1 @ layer.fc1.weight.T + layer.fc1.bias
    f = 0.5 * f * (1 + torch.erf(f / 2**0.5))
    return ln(h1 + f @ layer.fc2.weight.T + layer.fc2.bias, layer.norm2)


def test_the_head_is_crocs_post_ln_bert_layer_with_dropout(tiny):
    from mmbridge.objectives.reconstruction import ReconstructionHead

    torch.manual_seed(0)
    head = ReconstructionHead(64, 4, 16).eval()
    assert head.layer.dropout.p == 0.1 and head.layer.p == 0.1
    hidden = torch.randn(3, 4, 64)
    with torch.no_grad():
        want = bert_layer_by_hand(head.layer, hidden + head.position) @ head.out.weight.T + head.out.bias
        assert_same_math(head(hidden), want)
    head.train()
    torch.manual_seed(1)
    assert not torch.equal(head(hidden), head(hidden))  # dropout acts while training
    pre = ReconstructionHead(64, 4, 16, kind="pre_ln")
    assert pre.layer.norm_first and isinstance(pre.norm, torch.nn.LayerNorm)


def test_croc_refuses_a_bridge_that_does_not_l2_normalise(tiny_lm_dir, tiny_clip_dir):
    from mmbridge.objectives.croc import UnnormalisedBridgeError

    model, _ = build(tiny_lm_dir, tiny_clip_dir, {"name": "pool_adapter", "pooled": 2})
    with pytest.raises(UnnormalisedBridgeError, match="l2_normalize: true"):
        CrocObjective(model, pool_size=32)
    CrocObjective(model, pool_size=32, allow_unnormalised=True)  # an experiment may opt out
