"""Gradient checkpointing (same gradients, frozen or trained parts) and the precision switch."""

from __future__ import annotations

import copy

import pytest
import torch

from mmbridge.config import ModelConfig, RecipeError, recipe_from_dict
from mmbridge.models.bridges.deep import decoder_layers
from mmbridge.models.build import build_model
from mmbridge.models.checkpointing import enable_gradient_checkpointing, is_checkpointed, vision_blocks
from mmbridge.models.precision import autocast_dtype
from mmbridge.objectives import build_objective
from mmbridge.train.step import TrainStep
from tests.conftest import tiny_recipe_dict
from tests.rounding import assert_same_math

CONV = [
    {"from": "human", "value": "<image> and <image>: which has more shapes?"},
    {"from": "gpt", "value": "the first one, it has three"},
]


def build(tiny_lm_dir, tiny_clip_dir, checkpointing: bool, bridge=None):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge=bridge or {"name": "mlp"},
        lm={"path": tiny_lm_dir},
        max_length=160,
        system_prompt="",
        gradient_checkpointing=checkpointing,
    )
    return build_model(cfg)


def batch(proc):
    e = proc.encode(CONV, 2)
    ids = torch.tensor([e.input_ids, e.input_ids])
    return {
        "input_ids": ids,
        "labels": torch.tensor([e.labels, e.labels]),
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
    }


def step_grads(model, objective, b, train: dict) -> dict:
    for part, module in model.parts().items():
        module.requires_grad_(train[part])
        module.train(train[part])  # frozen parts run in eval mode, as apply_stage_modes sets them
    torch.manual_seed(3)
    objective(model, b, normalizer=None).loss.backward()
    out = {
        n: p.grad.clone() for n, p in [*model.named_parameters(), *objective.named_parameters()] if p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize(
    "train",
    [
        {"vision": False, "bridge": True, "lm": False},  # frozen LM carries gradients
        {"vision": True, "bridge": True, "lm": True},
    ],
)
@pytest.mark.parametrize("objective", ["lm", "croc"])
def test_checkpointing_gives_the_same_gradients(tiny_lm_dir, tiny_clip_dir, train, objective):
    plain, proc = build(tiny_lm_dir, tiny_clip_dir, False)
    ckpt, _ = build(tiny_lm_dir, tiny_clip_dir, True)
    assert all(is_checkpointed(m) for m in decoder_layers(ckpt.lm))
    assert vision_blocks(ckpt.vision) and all(is_checkpointed(m) for m in vision_blocks(ckpt.vision))
    b = batch(proc)
    croc = {"pool_size": 64, "allow_unnormalised": True, "head_dropout": 0.0}  # compared runs: no dropout masks
    cfg = {"name": objective, **(croc if objective == "croc" else {})}
    torch.manual_seed(1)
    obj_plain = build_objective(cfg, plain)
    obj_ckpt = copy.deepcopy(obj_plain)
    g0, g1 = step_grads(plain, obj_plain, b, train), step_grads(ckpt, obj_ckpt, b, train)
    assert g0.keys() == g1.keys() and any(k.startswith("bridge.") for k in g0)
    assert any(k.startswith("vision.") for k in g0) == train["vision"]
    scale = max(g.abs().max().item() for g in g0.values())  # the backward sums' terms (see tests/rounding.py)
    for k in g0:
        assert_same_math(g1[k], g0[k], msg=k, scale=scale)


def test_checkpointing_recomputes_and_saves_activations(tiny_lm_dir, tiny_clip_dir):
    """With checkpointing the decoder layers run twice per step (forward + recomputation)."""
    model, proc = build(tiny_lm_dir, tiny_clip_dir, True)
    model.requires_grad_(False).bridge.requires_grad_(True)
    calls = []
    layer = decoder_layers(model.lm)[0]
    # (a pre-hook: the recomputation stops early, once it has what the backward pass needs)
    hook = layer.mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    model(**{k: v for k, v in batch(proc).items() if k != "attention_mask"}).loss.backward()
    assert len(calls) == 2
    with torch.no_grad():  # no gradient: no recomputation and no checkpoint
        calls.clear()
        model(**{k: v for k, v in batch(proc).items() if k != "attention_mask"})
    assert len(calls) == 1
    hook.remove()


def test_checkpointing_survives_deepcopy(tiny_lm_dir, tiny_clip_dir):
    model, _ = build(tiny_lm_dir, tiny_clip_dir, True)
    twin = copy.deepcopy(model)
    layer = decoder_layers(twin.lm)[0]
    assert is_checkpointed(layer) and layer.forward.__self__ is layer
    assert enable_gradient_checkpointing(twin) == {"lm": 0, "vision": 0}  # already on: nothing twice


def test_checkpointing_keeps_names_and_writes_no_cache_it_would_write_twice(tiny_lm_dir, tiny_clip_dir):
    """The module tree and state-dict keys are those of a plain build (runs saved either way load either way); a
    checkpointed block carrying gradients leaves the KV cache unwritten, one under no_grad writes it."""
    plain, _ = build(tiny_lm_dir, tiny_clip_dir, False)
    ckpt, _ = build(tiny_lm_dir, tiny_clip_dir, True)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in ckpt.named_modules()] == [n for n, _ in plain.named_modules()]
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    ckpt.lm.requires_grad_(True)
    written = ckpt.lm(ids, use_cache=True).past_key_values
    assert written is None or written.get_seq_length() == 0
    with torch.no_grad():
        assert ckpt.lm(ids, use_cache=True).past_key_values.get_seq_length() == ids.shape[1]


def test_precision_is_fp32_on_cpu_and_checked(tiny_lm_dir, tiny_clip_dir, world):
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    model, proc = build(tiny_lm_dir, tiny_clip_dir, False)
    step = TrainStep(model, build_objective({"name": "lm"}, model))  # the engine's step applies the precision
    seen = []
    q_proj = decoder_layers(model.lm)[0].self_attn.q_proj
    hook = q_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    step(batch(proc), normalizer=None)
    model.precision = "bf16"
    step(batch(proc), normalizer=None)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["model"]["precision"] = "fp16"
    with pytest.raises(RecipeError, match="precision"):
        recipe_from_dict(data)
