"""Deep fusion: Flamingo's gated cross-attention layers and CogVLM's visual expert inside a frozen
Hugging Face Llama; the early-fusion path is untouched (tests/test_model.py)."""

from __future__ import annotations

import pytest
import torch

from mmbridge.config import ModelConfig
from mmbridge.models.build import build_model
from tests.conftest import Choices
from tests.rounding import assert_same_math

XATTN = {"name": "gated_xattn", "latents": 4, "heads": 4}
EXPERT = {"name": "visual_expert"}


def build(tiny_lm_dir, tiny_clip_dir, bridge):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge=bridge,
        lm={"path": tiny_lm_dir},
        max_length=160,
        system_prompt="",
    )
    model, proc = build_model(cfg)
    return model.eval(), proc


def encode(proc, text, n_images):
    conv = [{"from": "human", "value": text}, {"from": "gpt", "value": "a red circle"}]
    return torch.tensor([proc.encode(conv, n_images).input_ids])


def plain_hidden(model, ids, pixels):
    """The unmodified LM on the same input embeddings (no fusion context: the hooks stay idle)."""
    return model.lm.get_decoder()(inputs_embeds=model.embed(ids, pixels)).last_hidden_state


def randomise(module, scale=0.5):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def lm_logits(model, ids, pixels):
    with torch.no_grad():
        return model.lm.get_output_embeddings()(model(ids, pixel_values=pixels).hidden_states)


# -- Flamingo -----------------------------------------------------------------------------------
def test_gated_xattn_is_the_plain_lm_at_initialisation(tiny_lm_dir, tiny_clip_dir):
    model, proc = build(tiny_lm_dir, tiny_clip_dir, XATTN)
    bridge = model.bridge
    assert sorted(bridge.blocks) == ["0", "1"] and proc.num_image_tokens == 1 and bridge.visual_tokens == 4
    assert all(b.attn_gate.item() == 0 and b.ff_gate.item() == 0 for b in bridge.blocks.values())
    ids, pixels = encode(proc, "Look: <image> and then <image>. Same?", 2), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.lm.get_output_embeddings()(plain_hidden(model, ids, pixels))
        assert torch.equal(lm_logits(model, ids, pixels), want)
        randomise(bridge.blocks)  # open the gates: now the images matter
        assert not torch.allclose(lm_logits(model, ids, pixels), want)
    # no LM parameter belongs to the bridge, and the LM's own weights keep their names
    lm_ids = {id(p) for p in model.lm.parameters()}
    assert not any(id(p) in lm_ids for p in bridge.parameters())
    assert not any("blocks" in k for k in model.lm.state_dict())


def test_gated_xattn_every_k_layers(tiny_lm_dir, tiny_clip_dir):
    model, _ = build(tiny_lm_dir, tiny_clip_dir, {**XATTN, "every": 2})
    assert sorted(model.bridge.blocks) == ["0"]


def test_a_token_sees_only_the_last_image_before_it(tiny_lm_dir, tiny_clip_dir):
    model, proc = build(tiny_lm_dir, tiny_clip_dir, XATTN)
    randomise(model.bridge.blocks)
    ids = encode(proc, "First <image> middle words <image> last words", 2)
    img_pos = (ids[0] == model.image_token_id).nonzero().flatten().tolist()
    a, b = img_pos
    block_out = {}
    model.lm.get_decoder().layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: block_out.update(h=args[0].detach()), with_kwargs=True
    )
    pix = torch.randn(2, 3, 32, 32)
    new_first, new_second = pix.clone(), pix.clone()
    new_first[0] = torch.randn(3, 32, 32)
    new_second[1] = torch.randn(3, 32, 32)
    outs = {}
    for name, p in (("base", pix), ("first", new_first), ("second", new_second)):
        with torch.no_grad():
            outs[name] = (model(ids, pixel_values=p).hidden_states, block_out["h"])
    (full, xattn), (_full_1, xattn_1), (full_2, xattn_2) = outs["base"], outs["first"], outs["second"]
    # the first block's output is what each token takes from cross-attention
    assert torch.equal(xattn[:, :a], xattn_1[:, :a]) and torch.equal(xattn[:, :a], xattn_2[:, :a])  # no image yet
    assert not torch.allclose(xattn[:, a:b], xattn_1[:, a:b])  # image 1 is the last one before these
    assert torch.equal(xattn[:, a:b], xattn_2[:, a:b])  # image 2 comes after them
    assert torch.equal(xattn[:, b:], xattn_1[:, b:])  # image 1 is before the last preceding image
    assert not torch.allclose(xattn[:, b:], xattn_2[:, b:])
    # through the whole (causal) model, a later image never reaches an earlier token
    assert torch.equal(full[:, :b], full_2[:, :b]) and not torch.allclose(full[:, b:], full_2[:, b:])


# -- CogVLM -------------------------------------------------------------------------------------
def test_visual_expert_is_the_plain_lm_at_initialisation(tiny_lm_dir, tiny_clip_dir):
    model, proc = build(tiny_lm_dir, tiny_clip_dir, EXPERT)
    experts = model.bridge.experts
    layer = model.lm.get_decoder().layers[0]
    assert len(experts) == 2 and torch.equal(experts[0]["q_proj"].weight, layer.self_attn.q_proj.weight)
    assert experts[0]["q_proj"].weight.data_ptr() != layer.self_attn.q_proj.weight.data_ptr()
    assert torch.equal(experts[0]["ffn"].up_proj.weight, layer.mlp.up_proj.weight)
    ids, pixels = encode(proc, "<image>\nWhat is there?", 1), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_same_math(model(ids, pixel_values=pixels).hidden_states, plain_hidden(model, ids, pixels))


def test_visual_expert_changes_image_positions_only(tiny_lm_dir, tiny_clip_dir):
    model, proc = build(tiny_lm_dir, tiny_clip_dir, EXPERT)
    text_only = encode(proc, "What colour is a lemon?", 0)
    ids, pixels = encode(proc, "Describe <image> please", 1), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        text_before = model(text_only).hidden_states
        mixed_before = model(ids, pixel_values=pixels).hidden_states
    randomise(model.bridge.experts)  # as if only the expert had trained
    with torch.no_grad():
        assert torch.equal(model(text_only).hidden_states, text_before)
        mixed = model(ids, pixel_values=pixels).hidden_states
    first = int((ids[0] == model.image_token_id).nonzero()[0])
    assert torch.equal(mixed[:, :first], mixed_before[:, :first])  # text before the image: original weights
    assert not torch.allclose(mixed[:, first:], mixed_before[:, first:])


# -- both ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bridge", [XATTN, EXPERT], ids=["gated_xattn", "visual_expert"])
def test_kv_cached_generation_equals_full_recompute(tiny_lm_dir, tiny_clip_dir, bridge):
    model, proc = build(tiny_lm_dir, tiny_clip_dir, bridge)
    randomise(model.bridge.blocks if "blocks" in dict(model.bridge.named_children()) else model.bridge.experts, 2.0)
    convs = [
        [{"from": "human", "value": "<image>\nColour?"}],
        [{"from": "human", "value": "<image> or <image>: which?"}],
    ]
    prompts = [proc.encode_prompt(c) for c in convs]
    ids = proc.pad(prompts, proc.pad_id, left=True)
    lengths = torch.tensor([len(p) for p in prompts])
    mask = (torch.arange(ids.shape[1])[None] >= ids.shape[1] - lengths[:, None]).long()
    pixels = torch.randn(3, 3, 32, 32)
    with Choices(model) as choices:
        got = model.generate(ids, mask, pixels, max_new_tokens=5, eos_token_ids=[])
    choices.assert_clear([5, 5])  # no near-tie the cache's or the padding's other rounding could flip
    for row, (prompt, px) in enumerate(zip(prompts, (pixels[:1], pixels[1:]))):
        seq, out, full = torch.tensor([prompt]), [], []
        for _ in range(5):
            full.append(lm_logits(model, seq, px)[0, -1])
            out.append(int(full[-1].argmax()))
            seq = torch.cat([seq, torch.tensor([[out[-1]]])], 1)
        assert got[row] == out
        choices.assert_logits(row, full)  # every logit, not only the winners


@pytest.mark.parametrize("bridge", [XATTN, EXPERT], ids=["gated_xattn", "visual_expert"])
def test_trained_as_the_bridge_part_with_the_lm_frozen_and_reloaded(
    tiny_lm_dir, tiny_clip_dir, world, tmp_path, bridge
):
    from mmbridge.config import recipe_from_dict
    from mmbridge.runs import load_run
    from mmbridge.train.trainer import Trainer
    from tests.conftest import tiny_recipe_dict

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"], bridge=bridge)
    data["stages"] = data["stages"][:1]
    trainer = Trainer(recipe_from_dict(data), tmp_path / "run", progress=False)
    model = trainer.model
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    new = model.bridge.blocks if bridge is XATTN else model.bridge.experts
    new_before = {k: v.clone() for k, v in new.state_dict().items()}
    trainer.run()
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in lm_before.items())
    assert any(not torch.equal(v, new.state_dict()[k]) for k, v in new_before.items())
    if bridge is XATTN:
        assert all(b.attn_gate.item() != 0 for b in model.bridge.blocks.values())  # the gates opened
    loaded, proc = load_run(tmp_path / "run")
    ids, pixels = encode(proc, "<image>\nColour?", 1), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(
            model.eval()(ids, pixel_values=pixels).hidden_states, loaded(ids, pixel_values=pixels).hidden_states
        )


@pytest.mark.parametrize("bridge", [XATTN, EXPERT], ids=["gated_xattn", "visual_expert"])
def test_gradient_checkpointing_gives_the_same_bridge_gradients(tiny_lm_dir, tiny_clip_dir, bridge):
    """The fusion context travels as a decoder keyword, so the checkpoint's recomputation sees it too."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(
            vision={"name": "hf", "path": tiny_clip_dir},
            bridge=bridge,
            lm={"path": tiny_lm_dir, "gradient_checkpointing": checkpointing},
            system_prompt="",
        )
        model, proc = build_model(cfg)
        randomise(model.bridge, 0.3)
        model.train()
        conv = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red and blue"}]
        enc = proc.encode(conv, 1)
        ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
        model(
            ids, torch.ones_like(ids), torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), labels
        ).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.bridge.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    assert_same_math(grads[1], grads[0])  # the recomputed forward sums as the first did
