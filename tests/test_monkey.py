"""Monkey under `model.tiling: {mode: monkey}`: windows over the resized image and a global view, one LoRA per
window position on the shared frozen encoder, `train: {vision: lora}`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.config import ModelConfig, recipe_from_dict
from mmbridge.data.dataset import Collator
from mmbridge.data.layouts import window_ids
from mmbridge.models.build import build_model
from mmbridge.models.vision import build_vision_encoder
from mmbridge.models.window_lora import NormTap, WindowLoRA, WindowLoRALinear, mark
from tests.conftest import tiny_recipe_dict
from tests.rounding import assert_same_math

TILING = {"mode": "monkey", "windows": [2, 2], "rank": 2}


def picture(size, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def monkey(tiny_lm_dir, tiny_clip_dir):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir, "feature_layer": -1},
        bridge={"name": "mlp"},
        lm={"path": tiny_lm_dir},
        max_length=300,
        system_prompt="",
        tiling=TILING,
    )
    model, proc = build_model(cfg)
    return model.eval(), proc


def adapters(model) -> list[WindowLoRA]:
    return [m for m in model.vision.modules() if isinstance(m, WindowLoRA)]


def test_windows_and_global_view(monkey):
    model, proc = monkey
    views = proc.images([picture((50, 70), 0), picture((90, 30), 1)])
    assert views["views"] == 10 and views["visual_counts"] == [5 * 16, 5 * 16]
    assert window_ids(10, (2, 2)).tolist() == [0, 1, 2, 3, -1, 0, 1, 2, 3, -1]
    # per layer of the tower's two: q/k/v fused (Monkey's in_proj), out_proj, the MLP's parallel adapter
    assert len(adapters(model)) == 2 * 3
    assert sum(isinstance(m, WindowLoRALinear) for m in model.vision.modules()) == 2 * 4
    ranks = sorted(a.lora_A.shape[1] for a in adapters(model))
    assert ranks == [2, 2, 2, 2, 32, 32]  # the fixture's rank 2; the MLP's Monkey rank 32
    with pytest.raises(ValueError, match="not whole images"):
        window_ids(7, (2, 2))


def test_zero_adapters_leave_the_encoder_as_it_was(monkey, tiny_clip_dir):
    model, proc = monkey
    plain = build_vision_encoder({"name": "hf", "path": tiny_clip_dir, "feature_layer": -1}).eval()
    pixels = proc.images([picture((50, 70), 2)])["pixel_values"]
    with torch.no_grad():
        assert_same_math(model.vision_features(pixels), plain(pixels))


def test_only_the_windows_own_adapter_gets_gradient_from_its_tokens(monkey):
    model, proc = monkey
    torch.manual_seed(1)
    with torch.no_grad():
        for m in adapters(model):
            m.lora_B.normal_(std=0.1)  # B at zero would leave A without gradient
    model.vision.requires_grad_(False)
    for m in adapters(model):
        for p in m.parameters():
            p.requires_grad_(True)
    pixels = proc.images([picture((50, 70), 3)])["pixel_values"]
    for view in range(5):
        for m in adapters(model):
            m.lora_A.grad = m.lora_B.grad = m.lora_scale.grad = None
        model.vision_features(pixels)[view].sum().backward()
        for m in adapters(model):
            for grad in (m.lora_A.grad, m.lora_B.grad, m.lora_scale.grad):
                used = grad.reshape(4, -1).abs().sum(1) > 0
                want = torch.zeros(4, dtype=torch.bool)
                if view < 4:
                    want[view] = True  # the global view (4) goes through no adapter
                assert torch.equal(used, want), view
    with torch.no_grad():
        for m in adapters(model):
            m.lora_B.zero_()
    model.vision.requires_grad_(False)


def test_a_monkey_run_trains_only_the_adapters_and_reloads(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    from mmbridge.runs import load_run
    from mmbridge.train.trainer import Trainer

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"], bridge={"name": "mlp"})
    data["model"].update(tiling=TILING, max_length=300)
    data["stages"][0].update(steps=2, train={"vision": "lora", "bridge": "full"}, lr={"vision": 1e-2, "bridge": 1e-2})
    data["stages"][1].update(steps=1)  # bridge + the LM's own LoRA, beside the tower's adapters
    trainer = Trainer(recipe_from_dict(data), tmp_path / "run", progress=False)
    base = {n: p.detach().clone() for n, p in trainer.model.vision.named_parameters()}
    trainer.run()
    after = dict(trainer.model.vision.named_parameters())
    changed = {n for n in base if not torch.equal(base[n], after[n].detach())}
    assert changed and all("lora_" in n for n in changed)  # the adapters alone; the tower stays as it was
    model, proc = load_run(tmp_path / "run", device="cpu")
    for n, p in model.vision.named_parameters():
        assert torch.equal(p, after[n].detach()), n
    lm_lora = {n: p for n, p in trainer.model.lm.named_parameters() if "lora_" in n}
    assert lm_lora and all(torch.equal(dict(model.lm.named_parameters())[n], p) for n, p in lm_lora.items())
    items = []
    for k in range(2):
        views = proc.images([picture((40 + 20 * k, 60), k)])
        enc = proc.encode(
            [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}], 1, counts=views["counts"]
        )
        items.append(
            {
                "id": str(k),
                "input_ids": enc.input_ids,
                "labels": enc.labels,
                "image_counts": views["visual_counts"],
                **{k2: views[k2] for k2 in ("pixel_values", "visual_index", "views")},
            }
        )
    batch = Collator(proc)(items)
    with torch.no_grad():
        a = model(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], visual_index=batch["visual_index"]
        ).hidden_states
        b = trainer.model.eval()(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], visual_index=batch["visual_index"]
        ).hidden_states
    assert torch.equal(a, b)


def test_vision_lora_needs_window_adapters(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    from mmbridge.config import RecipeError
    from mmbridge.train.trainer import Trainer

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["stages"][0].update(train={"vision": "lora", "bridge": "full"}, lr={"vision": 1e-3, "bridge": 1e-3})
    with pytest.raises(ValueError, match="per-window adapters"):
        Trainer(recipe_from_dict(data), tmp_path / "run", progress=False).run()
    data["stages"][0].update(train={"bridge": "lora"}, lr={"bridge": 1e-3})
    with pytest.raises(RecipeError, match="lm only"):
        recipe_from_dict(data)


def test_a_tiled_recipe_is_not_exported():
    from mmbridge.interop.export import recipe_blockers

    for mode in ("uhd", "monkey"):
        cfg = ModelConfig(vision={"name": "hf", "path": "x"}, bridge={"name": "mlp"}, tiling={"mode": mode})
        assert recipe_blockers(cfg) == [
            f"model.tiling.mode: {mode} gives each image its own views and token "
            "count; the exported LLaVA reads one S×S view per image"
        ]
    assert recipe_blockers(ModelConfig(vision={"name": "hf", "path": "x"}, bridge={"name": "mlp"})) == []
    # AnyRes on an hf tower exports as LLaVA-NeXT (tests/test_import_next.py), unless LLaVA-NeXT lacks an option
    anyres = {"mode": "anyres"}
    assert recipe_blockers(ModelConfig(vision={"name": "hf", "path": "x"}, bridge={"name": "mlp"}, tiling=anyres)) == []
    assert recipe_blockers(
        ModelConfig(
            vision={"name": "hf", "path": "x"},
            bridge={"name": "mlp"},
            tiling={**anyres, "anyres_max": 9, "newline": False},
        )
    ) == [
        "model.tiling.newline: false; LLaVA-NeXT adds a newline after every row",
        "model.tiling.anyres_max: LLaVA-NeXT never shrinks the map (LLaVA-OneVision does)",
    ]


def test_the_data_index_counts_monkeys_views_without_reading_images(monkey, tmp_path):
    import json

    from mmbridge.data.dataset import ConversationDataset

    model, proc = monkey
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    records = [{"id": str(k), "image": f"{k}.png", "conversations": conv} for k in range(2)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    ds = ConversationDataset(tmp_path / "data.json", tmp_path, proc, cache=False)  # no image file exists yet
    assert len(ds) == 2
    for k, size in enumerate([(50, 70), (90, 30)]):
        picture(size, k).save(tmp_path / f"{k}.png")
        item = ds[k]
        assert ds.lengths[k] == len(item["input_ids"]) and item["input_ids"].count(proc.image_token_id) == 5 * 16


def test_monkeys_adapters_by_hand_fused_qkv_and_the_mlp_adapter_beside_the_mlp(monkey):
    """Monkey's rule: in_proj (q, k, v fused) + s·B·A·x with one A; the block's output x1 + mlp(ln2(x1)) +
    s·B·A·x1 with x1 the block's input to ln2 (the MLP adapter reads the residual stream, not the normalised one);
    per window, nothing for the global view."""
    model, _ = monkey
    layer = next(m for m in model.vision.modules() if isinstance(getattr(m, "layer_norm2", None), NormTap))
    qkv = layer.self_attn.lora_q_proj_k_proj_v_proj
    mlp_adapter = layer.mlp.lora_mlp
    torch.manual_seed(2)
    saved = {id(p): p.detach().clone() for a in (qkv, mlp_adapter) for p in a.parameters()}
    with torch.no_grad():
        for a in (qkv, mlp_adapter):
            a.lora_B.normal_(std=0.1)
            a.lora_scale.uniform_(0.5, 2.0)
    ids = torch.tensor([1, -1])
    h = torch.randn(2, 5, 32)
    mark(model.vision, ids)
    with torch.no_grad():
        d = 32
        for k, proj in enumerate((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)):
            want = proj.base(h).clone()
            want[0] += qkv.lora_scale[1] * h[0] @ qkv.lora_A[1].T @ qkv.lora_B[1, k * d : (k + 1) * d].T
            assert_same_math(proj(h), want)
        seen = {}
        hook = layer.layer_norm2.register_forward_pre_hook(lambda m, args: seen.setdefault("x1", args[0]))
        takes_causal = "causal_attention_mask" in layer.forward.__code__.co_varnames
        out = layer(h, None, None) if takes_causal else layer(h, None)
        hook.remove()
        out = out[0] if isinstance(out, tuple) else out
        x1 = seen["x1"]
        want = x1 + layer.mlp.mlp(layer.layer_norm2.norm(x1))
        want[0] += mlp_adapter.lora_scale[1] * x1[0] @ mlp_adapter.lora_A[1].T @ mlp_adapter.lora_B[1].T
        assert_same_math(out, want)
        for a in (qkv, mlp_adapter):
            for p in a.parameters():
                p.copy_(saved[id(p)])
    mark(model.vision, None)


def test_a_fused_adapter_computes_its_down_projection_once_and_lets_it_go(monkey):
    model, _ = monkey
    layer = next(m for m in model.vision.modules() if isinstance(getattr(m, "layer_norm2", None), NormTap))
    qkv = layer.self_attn.lora_q_proj_k_proj_v_proj
    assert qkv.users == 3 and layer.mlp.lora_mlp.users == 1
    calls = []
    hook = qkv.dropout.register_forward_hook(lambda m, args, out: calls.append(1))
    mark(model.vision, torch.tensor([0, -1]))
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj(h)
    hook.remove()
    assert len(calls) == 1 and qkv._down is None  # one A·x for the three projections, not kept afterwards
    mark(model.vision, None)
