"""LaVIN's adapters in the vision tower (`mma.vision`, its `set_Clip_Adapter`): the two-path router that reads each
image's class token (the default, `router`) and the single-path RepAdapter (`normal`); zero start, the rule by hand,
training in an mma stage and reload."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from mmbridge.config import RecipeError, recipe_from_dict
from mmbridge.models.mma import VisionAdapter, VisionRouterAdapter, add_vision_mma
from mmbridge.models.weights import restore_structure
from mmbridge.runs import load_run
from mmbridge.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict

CONV = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]
U = 2.0**-24  # fp32 unit roundoff


def vision_adapters(vision, kind=VisionAdapter):
    return [m for m in vision.modules() if isinstance(m, kind)]


def leave_zero_start(adapter, seed: int = 0, router_scale: float = 1.0) -> None:
    """Known, non-zero weights for the paths (drawn from a seed), so the two paths and the mixtures differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable():
            p.copy_(torch.randn(p.shape, generator=g))
        adapter.router.weight.mul_(router_scale)


def router_by_hand(adapter, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LaVIN's RepAdapter_Router for one image's normalised tokens h [L, d], written out in float64 from the
    adapter's weights: w = softmax((R h_0 + r) / t) from the class token h_0; per token a = A h + a_b (no activation,
    dropout off in eval); each up-projection is a Conv1d(dim, d, 1, groups=G), so output i reads only the bottleneck
    block of its own group; out = h + s (w_0 B a + w_1 D a).

    Returns (out, w, tol): `tol`, per output, is what an fp32 evaluation may be off by (`output_tolerance`)."""
    h = h.double()
    A, a_b = adapter.down.weight.double(), adapter.down.bias.double()
    (B, b_b), (D, d_b) = ((up.weight.double(), up.bias.double()) for up in adapter.up)
    R, r_b = adapter.router.weight.double(), adapter.router.bias.double()
    L, d = h.shape
    dim, G, s = A.shape[0], adapter.up[0].groups, adapter.scale
    logits = [sum(R[o, k] * h[0, k] for k in range(d)) + r_b[o] for o in range(2)]
    e = [math.exp(float(z) / adapter.temperature) for z in logits]
    w = [ei / sum(e) for ei in e]
    dw = weight_tolerance(adapter, h[0].abs(), d + 1)
    out, tol = torch.empty(L, d, dtype=torch.float64), torch.empty(L, d, dtype=torch.float64)
    for t in range(L):
        a = [sum(A[j, k] * h[t, k] for k in range(d)) + a_b[j] for j in range(dim)]
        a_abs = [sum(abs(A[j, k] * h[t, k]) for k in range(d)) + abs(a_b[j]) for j in range(dim)]
        for i in range(d):
            block = i // (d // G)  # output i's group; it reads bottleneck inputs [block·dim/G, (block+1)·dim/G)
            first = block * dim // G
            ins = range(first, first + dim // G)
            up_b = sum(B[i, j - first] * a[j] for j in ins) + b_b[i]
            up_d = sum(D[i, j - first] * a[j] for j in ins) + d_b[i]
            out[t, i] = h[t, i] + s * (w[0] * up_b + w[1] * up_d)
            mag = [sum(abs(W[i, j - first]) * a_abs[j] for j in ins) + abs(c[i]) for W, c in ((B, b_b), (D, d_b))]
            bound = abs(h[t, i]) + s * (w[0] * mag[0] + w[1] * mag[1])
            tol[t, i] = output_tolerance(d, dim // G, bound, dw, s * (mag[0] + mag[1]))
    return out, torch.tensor(w, dtype=torch.float64), tol


def weight_tolerance(adapter, summary_abs: torch.Tensor, terms: int) -> float:
    """What fp32 router weights may be off by: the logits are sums of `terms` roundings of at most U times
    Σ|R||summary| + |r| each; the two-way softmax's slope is at most 1/4 in each logit / t; exp and the division
    add a few ulps. Doubled for safety."""
    R, r_b = adapter.router.weight.double(), adapter.router.bias.double()
    logit_mag = float((summary_abs.double() @ R.abs().T + r_b.abs()).max())
    return 2 * (2 * 0.25 * terms * U * logit_mag / adapter.temperature + 8 * U)


def output_tolerance(d: int, per_group: int, bound, dw: float, paths) -> float:
    """What an fp32 output may be off by: a chain of d + dim/G + 8 roundings (the down sum of d terms and a bias, the
    up sum of dim/G terms and a bias, the weighting, the two paths, the scale, the residual), each at most U times
    the absolute sum `bound`; and the weights' error dw times the two paths' size (w_0 + w_1 = 1, so an error in one
    is the other's). Doubled for safety."""
    return 2 * ((d + per_group + 8) * U * float(bound) + dw * float(paths))


@pytest.fixture
def tower(tiny):
    model, _ = tiny
    return copy.deepcopy(model.vision).eval()


def test_the_default_vision_adapter_is_lavins_router_and_the_tower_starts_unchanged(tiny, tower):
    model, _ = tiny
    pixels = torch.randn(2, 3, 32, 32)
    assert add_vision_mma(tower, dim=4) == 2  # one per ViT block, before its attention
    normal = copy.deepcopy(model.vision).eval()
    assert add_vision_mma(normal, dim=4, kind="normal") == 2
    with torch.no_grad():
        want = model.vision.eval()(pixels)
        assert torch.equal(want, tower(pixels)) and torch.equal(want, normal(pixels))  # zero start: h + 0
        routers = vision_adapters(tower, VisionRouterAdapter)
        assert len(routers) == 2 and not vision_adapters(normal, VisionRouterAdapter)
        r = routers[0]
        assert r.read == "cls" and r.temperature == 10.0 and r.dropout.p == 0.1 and r.scale == 1.0
        assert [up.groups for up in r.up] == [2, 2] and isinstance(r.down, nn.Linear)  # one shared down-projection
        assert all(torch.equal(p, torch.zeros_like(p)) for up in r.up for p in up.parameters())
        leave_zero_start(r)
        assert not torch.equal(want, tower(pixels))  # the adapter sits on a path the features depend on


def test_the_vision_router_is_lavins_repadapter_router_by_hand(tower):
    add_vision_mma(tower, dim=4, temperature=10.0)
    adapter = vision_adapters(tower, VisionRouterAdapter)[0].eval()
    leave_zero_start(adapter)
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(1))  # two images: CLS + 4x4 patches
    with torch.no_grad():
        got, w_got = adapter(x), adapter.weights(adapter.norm(x))
        for b in range(2):
            h = adapter.norm(x[b : b + 1])[0]
            want, w, tol = router_by_hand(adapter, h)
            assert ((got[b].double() - want).abs() <= tol).all()
            torch.testing.assert_close(w_got[b].double(), w, rtol=0, atol=weight_tolerance(adapter, h[0].abs(), 33))
    adapter.train()  # dropout acts on the shared down-projection's output while training
    torch.manual_seed(1)
    assert not torch.equal(adapter(x), adapter(x))


def test_the_vision_router_reads_each_images_class_token(tower):
    add_vision_mma(tower, dim=4)
    adapter = vision_adapters(tower, VisionRouterAdapter)[0].eval()
    leave_zero_start(adapter)
    g = torch.Generator().manual_seed(2)
    one = torch.randn(1, 17, 32, generator=g)
    other_cls = one.clone()
    other_cls[0, 0] = torch.randn(32, generator=g)  # the same patches, another class token
    other_patch = one.clone()
    other_patch[0, 5] = torch.randn(32, generator=g)  # the same class token, another patch
    with torch.no_grad():
        x = torch.cat([one, other_cls, other_patch])
        w = adapter.weights(adapter.norm(x))
        # two images in one batch with different class tokens take different mixtures ...
        assert (w[0] - w[1]).abs().max() > 0.01  # (the rounding allows ~1e-5)
        out = adapter(x)
        assert (out[0, 1:] - out[1, 1:]).abs().max() > 0.01  # ... of the same patches
        # ... and a patch other than the class token leaves the mixture as it was
        h = adapter.norm(x)
        torch.testing.assert_close(w[2], w[0], rtol=0, atol=2 * weight_tolerance(adapter, h[0, 0].abs(), 33))
        # each image's mixture is its own: the same alone as beside other images (both within the rounding)
        for b in range(3):
            alone = adapter(x[b : b + 1])[0]
            _, _, tol = router_by_hand(adapter, h[b])
            assert ((out[b].double() - alone.double()).abs() <= 2 * tol).all()


def test_a_tower_without_a_class_token_routes_on_the_mean_of_its_tokens():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    tower = SiglipVisionModel(config).eval()
    assert add_vision_mma(tower, dim=4) == 2
    adapter = vision_adapters(tower, VisionRouterAdapter)[0]
    assert adapter.read == "mean"
    leave_zero_start(adapter)
    h = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        R, r_b = adapter.router.weight.double(), adapter.router.bias.double()
        want = torch.softmax((h.double().mean(1) @ R.T + r_b) / adapter.temperature, -1)
        # the mean adds 16 roundings of at most U times the mean of |h| to each of the router's terms
        atol = weight_tolerance(adapter, h.abs().mean(1).max(0).values, 32 + 1 + 16)
        torch.testing.assert_close(adapter.weights(h).double(), want, rtol=0, atol=atol)


def test_the_single_path_form_stays_as_vision_normal(tower):
    add_vision_mma(tower, dim=4, kind="normal")
    adapter = vision_adapters(tower)[0]
    assert type(adapter) is VisionAdapter and adapter.up.groups == 2 and adapter.dropout.p == 0.1
    torch.manual_seed(0)
    with torch.no_grad():
        adapter.up.weight.normal_()
        adapter.up.bias.normal_()
        x = torch.randn(5, 32)
        h = adapter.norm(x)
        a = h @ adapter.down.weight.T + adapter.down.bias  # down; dropout is off in eval
        w, half = adapter.up.weight, 2  # grouped up: output block g reads bottleneck block g only
        up = torch.cat([a[:, g * half : (g + 1) * half] @ w[g * 16 : (g + 1) * 16].T for g in range(2)], -1)
        torch.testing.assert_close(adapter(x), h + up + adapter.up.bias)
    with pytest.raises(ValueError, match="router"):
        add_vision_mma(tower, kind="block")


def test_a_run_saved_before_the_router_reloads_its_single_path_adapters(tiny):
    """Runs saved before the router existed wrote `vision: true` for the single path; newer runs write the kind."""
    model, _ = tiny
    lm_mma = {"dim": 4, "temperature": 10.0, "where": ["attention"], "groups": 2, "dropout": 0.1}
    for saved, kind in ((True, VisionAdapter), ("normal", VisionAdapter), ("router", VisionRouterAdapter)):
        copied = copy.deepcopy(model)
        restore_structure(copied, {"mma": {**lm_mma, "vision": saved}})
        assert {type(m) for m in vision_adapters(copied.vision)} == {kind}, saved


def mma_vision_recipe(tiny_lm_dir, tiny_clip_dir, world, vision, lr_vision=True):
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["stages"][1].update(
        train={"bridge": "full", "lm": "mma"},
        lr={"bridge": 1e-2, "lm": 1e-2, **({"vision": 1e-2} if lr_vision else {})},
        mma={"dim": 4, "vision": vision},
    )
    return recipe_from_dict(data)


def test_vision_settings_are_checked(tiny_lm_dir, tiny_clip_dir, world):
    with pytest.raises(RecipeError, match="lr.vision"):
        mma_vision_recipe(tiny_lm_dir, tiny_clip_dir, world, True, lr_vision=False)
    with pytest.raises(RecipeError, match="mma.vision"):
        mma_vision_recipe(tiny_lm_dir, tiny_clip_dir, world, "routr")
    for ok in (False, True, "router", "normal"):
        mma_vision_recipe(tiny_lm_dir, tiny_clip_dir, world, ok)


@pytest.mark.parametrize(
    ("vision", "kind", "per_block"),
    [(True, VisionRouterAdapter, 8), ("normal", VisionAdapter, 4)],  # router: down, two ups, router (weight, bias)
)
def test_vision_adapters_train_in_an_mma_stage_and_reload(
    tiny_lm_dir, tiny_clip_dir, world, tmp_path, vision, kind, per_block
):
    trainer = Trainer(mma_vision_recipe(tiny_lm_dir, tiny_clip_dir, world, vision), tmp_path / "run", progress=False)
    before = {n: p.detach().clone() for n, p in trainer.model.vision.named_parameters()}
    trainer.run()
    model = trainer.model.eval()
    meta = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())
    assert meta["mma"]["vision"] == ("router" if vision is True else vision)  # read back from the adapters
    vision_trained = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    parts = ("down", "up", "router") if kind is VisionRouterAdapter else ("down", "up")
    assert vision_trained and all(any(f".layer_norm1.{k}." in n for k in parts) for n in vision_trained)
    assert len(vision_trained) == 2 * per_block
    for n, p in model.vision.named_parameters():  # the adapters left their zero start; the tower stayed frozen
        if n in vision_trained:  # (feature_layer -2: block 1's output is not read, so its adapter gets no gradient)
            assert not n.startswith("model.encoder.layers.0.layer_norm1.up.") or p.abs().sum() > 0
        else:
            assert torch.equal(p, before[n.replace("layer_norm1.norm.", "layer_norm1.")]), n
    assert {type(m) for m in vision_adapters(model.vision)} == {kind}
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loaded, _ = load_run(tmp_path / "run")
        assert {type(m) for m in vision_adapters(loaded.vision)} == {kind}
        assert len(vision_adapters(loaded.vision)) == 2
        assert torch.equal(model.vision(pixels), loaded.vision.eval()(pixels))
        ids = torch.tensor([trainer.processor.encode(CONV, 1).input_ids])
        assert torch.equal(
            model(ids, pixel_values=pixels[:1]).hidden_states, loaded(ids, pixel_values=pixels[:1]).hidden_states
        )
