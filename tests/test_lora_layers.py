"""LoRA in some of the LM's layers (`lora.layers`): adapters only there, and no backward pass below them."""

from __future__ import annotations

import pytest
import torch

from mmbridge.config import LoraConfig, ModelConfig, StageConfig
from mmbridge.models.build import build_model
from mmbridge.models.language import lora_layers
from mmbridge.train.parts import apply_stage_modes


def test_layers_are_all_a_list_or_the_top_n():
    assert lora_layers(None, 30) is None
    assert lora_layers(15, 30) == list(range(15, 30))
    assert lora_layers([3, 1, 3], 30) == [1, 3]
    for bad in (0, 31, [30], [], "top", True):
        with pytest.raises(ValueError, match="lora.layers"):
            lora_layers(bad, 30)


def test_top_layer_adapters_stop_the_backward_pass_below_them(tiny_lm_dir, tiny_clip_dir):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge={"name": "pool_adapter", "pooled": 2},
        lm={"path": tiny_lm_dir},
        max_length=128,
        system_prompt="",
    )
    model, proc = build_model(cfg)
    stage = StageConfig(
        name="s",
        train={"vision": "frozen", "bridge": "frozen", "lm": "lora"},
        lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], layers=1),
    )
    injected = apply_stage_modes(model, stage)
    assert injected["layers"] == [1]  # the tiny LM has 2 layers: the top one
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and ".layers.1." in n for n in trained)
    reached = []
    model.lm.model.layers[0].register_full_backward_hook(lambda *a: reached.append(0))
    model.lm.model.layers[1].register_full_backward_hook(lambda *a: reached.append(1))
    enc = proc.encode([{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}], 1)
    ids = torch.tensor([enc.input_ids])
    model.train()
    model(ids, torch.ones_like(ids), torch.randn(1, 3, 32, 32), torch.tensor([enc.labels])).loss.backward()
    assert reached == [1]
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
