"""Bridge mechanics: MLP projector, InfMLLM pool-adapter order and divisibility, L2 normalisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmbridge.models.bridges import build_bridge
from tests.rounding import assert_same_math


def identity_pool_adapter(grid=(4, 4), pooled=2, dim=3):
    bridge = build_bridge({"name": "pool_adapter", "pooled": pooled, "depth": 1}, dim, dim, grid)
    with torch.no_grad():
        bridge.proj[0].weight.copy_(torch.eye(dim))
        bridge.proj[0].bias.zero_()
    return bridge


def test_pool_adapter_averages_blocks_in_row_major_order():
    rows, cols = 4, 4
    # token features encode their own (row, col, 1)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    feats = torch.stack([r.flatten(), c.flatten(), torch.ones(rows * cols, dtype=torch.long)], -1).float()[None]
    out = identity_pool_adapter()(feats)[0]
    assert out.shape == (4, 3)
    # pooled cell k = (k // 2, k % 2) covers rows 2i..2i+1, cols 2j..2j+1 → mean (2i+0.5, 2j+0.5)
    expected = torch.tensor([[0.5, 0.5, 1], [0.5, 2.5, 1], [2.5, 0.5, 1], [2.5, 2.5, 1]])
    assert torch.equal(out, expected)


def test_pool_adapter_token_count_and_width():
    bridge = build_bridge({"name": "pool_adapter", "pooled": 4}, 1280, 576, (8, 8))
    out = bridge(torch.randn(3, 64, 1280))
    assert out.shape == (3, 16, 576) and bridge.num_tokens == 16


def test_pool_adapter_rejects_indivisible_grid():
    with pytest.raises(ValueError, match=r"7x7 token grid is not divisible by pooled=4"):
        build_bridge({"name": "pool_adapter", "pooled": 4}, 8, 8, (7, 7))


def test_pool_adapter_rejects_wrong_token_count():
    bridge = build_bridge({"name": "pool_adapter", "pooled": 2}, 8, 8, (4, 4))
    with pytest.raises(ValueError, match="expected 4x4=16 tokens"):
        bridge(torch.randn(1, 17, 8))


def test_mlp_is_linear_gelu_linear_and_keeps_token_count():
    bridge = build_bridge({"name": "mlp"}, 10, 6, (3, 3))
    kinds = [type(m) for m in bridge.proj]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear]
    x = torch.randn(2, 9, 10)
    lin1, _, lin2 = bridge.proj
    assert torch.allclose(bridge(x), lin2(torch.nn.functional.gelu(lin1(x))))
    assert bridge.num_tokens == 9


def test_linear_bridge_and_cls_tokens():
    bridge = build_bridge({"name": "linear"}, 10, 6, (3, 3), in_tokens=10)
    assert [type(m) for m in bridge.proj] == [nn.Linear] and bridge.num_tokens == 10


def test_l2_normalize_switch():
    torch.manual_seed(0)
    plain = build_bridge({"name": "mlp"}, 8, 8, (2, 2))
    normed = build_bridge({"name": "mlp", "l2_normalize": True}, 8, 8, (2, 2))
    normed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 8)
    assert torch.allclose(normed(x).norm(dim=-1), torch.ones(2, 4), atol=1e-6)
    assert torch.allclose(normed(x), torch.nn.functional.normalize(plain(x), dim=-1))


def test_unknown_bridge_and_option_errors():
    with pytest.raises(ValueError, match="unknown bridge 'qformerz'"):
        build_bridge({"name": "qformerz"}, 8, 8, (2, 2))
    with pytest.raises(ValueError, match="pooled_size"):
        build_bridge({"name": "pool_adapter", "pooled_size": 2}, 8, 8, (2, 2))


def test_pool_adapter_position_embedding_tells_cells_apart():
    """Identical features in every cell: without pos_embed all tokens are equal, with it each cell differs."""
    feats = torch.ones(2, 64, 8)
    torch.manual_seed(0)
    plain = build_bridge({"name": "pool_adapter", "pooled": 4}, 8, 16, (8, 8))
    torch.manual_seed(0)
    posed = build_bridge({"name": "pool_adapter", "pooled": 4, "pos_embed": True}, 8, 16, (8, 8))
    a, b = plain(feats), posed(feats)
    assert plain.pos_embed is None  # equal rows up to rounding: kernels may sum a block's rows in another order
    assert_same_math(a, a[:, :1].expand_as(a))
    assert posed.pos_embed.shape == (16, 16) and torch.equal(b, a + posed.pos_embed)  # same MLP init, then + E
    assert len({tuple(t.tolist()) for t in b[0]}) == 16
    b.sum().backward()
    assert torch.equal(posed.pos_embed.grad, torch.full((16, 16), 2.0))  # one gradient per image in the batch


@pytest.mark.parametrize("name", ["mlp", "pool_adapter"])
def test_input_norm_makes_the_output_independent_of_feature_scale(name):
    """`norm: true` puts a LayerNorm first: features x and 1000·x give the same tokens; without it they do not."""
    feats = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    opts = {"pooled": 2} if name == "pool_adapter" else {}
    torch.manual_seed(0)
    normed = build_bridge({"name": name, "norm": True, **opts}, 32, 24, (4, 4))
    plain = build_bridge({"name": name, **opts}, 32, 24, (4, 4))
    assert isinstance(normed.proj[0], nn.LayerNorm) and isinstance(plain.proj[0], nn.Linear)
    torch.testing.assert_close(normed(feats * 1000), normed(feats), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain(feats * 1000), plain(feats) * 1, atol=1.0)
