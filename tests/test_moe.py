"""MoE-tuning: experts copied from the FFN, top-k routing, the balancing loss, what trains, save → load."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mmbridge.config import RecipeError, recipe_from_dict
from mmbridge.models.moe import (
    MoEFeedForward,
    add_moe,
    aux_loss,
    balancing_loss,
    balancing_over,
    chosen_layers,
    is_moe_param,
    moe_layers,
    moe_settings,
    tally,
)
from mmbridge.runs import load_run
from mmbridge.train.flops import StepFlops
from mmbridge.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict


def tiny_llama(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()


def test_copied_experts_with_renormalised_weights_equal_the_dense_model(tiny_lm_dir):
    lm = tiny_llama(tiny_lm_dir)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        dense = lm(ids).logits
        torch.manual_seed(0)
        assert add_moe(lm, experts=4, top_k=2, layers="all") == [0, 1]
        for m in moe_layers(lm):  # routers that prefer different experts per token: the sum must not care
            nn.init.normal_(m.router.weight, std=1.0)
        moe = lm(ids).logits
    assert len(moe_layers(lm)) == 2
    torch.testing.assert_close(moe, dense, atol=1e-5, rtol=1e-5)
    assert not torch.equal(moe_layers(lm)[0].route(torch.randn(5, 64))[1][:, 0].unique(), torch.tensor([0]))


def test_top_k_routing_matches_a_per_token_computation():
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    layer = MoEFeedForward(ffn, 8, num_experts=3, top_k=2)
    for e in layer.experts:  # experts that differ
        nn.init.normal_(e[0].weight)
    x = torch.randn(2, 5, 8)
    got = layer(x)
    probs = (x @ layer.router.weight.T).softmax(-1)
    want = torch.zeros_like(x)
    for b in range(2):
        for t in range(5):
            w, idx = probs[b, t].topk(2)
            w = w / w.sum()
            want[b, t] = sum(wi * layer.experts[int(i)](x[b, t]) for wi, i in zip(w, idx))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_an_expert_no_token_selects_gets_no_gradient():
    torch.manual_seed(0)
    layer = MoEFeedForward(nn.Linear(8, 8), 8, num_experts=4, top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 10.0  # every token with x[0] > 0 → expert 2, else the first index of a tie
    x = torch.randn(16, 8).abs()
    layer(x).sum().backward()
    grads = [e.weight.grad for e in layer.experts]
    assert grads[2] is not None and grads[2].abs().sum() > 0
    for e in (0, 1, 3):
        assert grads[e] is None or grads[e].abs().sum() == 0


def test_balancing_loss_equals_a_hand_computation():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    chosen = probs.topk(1, dim=-1).indices.reshape(-1)  # experts 0, 1, 0, 2
    counts = torch.bincount(chosen, minlength=3)
    # f = (2/4, 1/4, 1/4), P = column means (0.375, 0.3, 0.325); loss = 3 * sum(f * P)
    want = 3 * (0.5 * 0.375 + 0.25 * 0.3 + 0.25 * 0.325)
    assert balancing_loss(probs, counts, 1).item() == pytest.approx(want, rel=1e-6)
    uniform = torch.full((6, 3), 1 / 3)
    assert balancing_loss(uniform, torch.tensor([4, 4, 4]), 2).item() == pytest.approx(1.0)


def test_layer_choices_and_recipe_errors(tiny_lm_dir, tiny_clip_dir, world):
    # MoE-LLaVA's `sparse` mode: list(range(n))[::2], layers 0, 2, 4, …
    assert chosen_layers(6, "every_other") == [0, 2, 4] and chosen_layers(5, "every_other") == [0, 2, 4]
    assert chosen_layers(3, [2, 0]) == [0, 2]
    with pytest.raises(ValueError, match="outside"):
        chosen_layers(2, [5])
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["stages"][1]["moe"] = {"experts": 2, "top_k": 3}
    with pytest.raises(RecipeError, match=r"stages\[1\].*moe"):
        recipe_from_dict(data)
    data["stages"][1]["moe"] = {"layers": "odd"}
    with pytest.raises(RecipeError, match="moe.layers"):
        recipe_from_dict(data)
    for bad, msg in (
        ({"second": "gumbel", "top_k": 1}, "gumbel samples the second"),
        ({"balance": "top2"}, "moe.balance"),
        ({"capacity_factor": 0}, "capacity_factor"),
        ({"eval_capacity_factor": 2.0}, "set capacity_factor too"),
        ({"min_capacity": -1}, "min_capacity"),
    ):
        data["stages"][1]["moe"] = bad
        with pytest.raises(RecipeError, match=msg):
            recipe_from_dict(data)
    data["stages"][1]["moe"] = {}
    data["stages"][1]["train"] = {"bridge": "moe"}
    with pytest.raises(RecipeError, match="moe is supported for the lm only"):
        recipe_from_dict(data)


def moe_recipe(tiny_lm_dir, tiny_clip_dir, world):
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["stages"][1].update(
        train={"bridge": "frozen", "lm": "moe"},
        lr={"lm": 1e-2},
        moe={"experts": 3, "top_k": 2, "layers": [1], "aux_weight": 0.1},
    )
    return recipe_from_dict(data)


def test_moe_stage_trains_only_routers_and_experts_and_reloads(
    tiny_lm_dir, tiny_clip_dir, world, tmp_path, monkeypatch
):
    routed = []  # per MoE forward: (training?, the router probabilities and choices of the tokens it counts)
    original_route = MoEFeedForward.route

    def route(self, h):
        probs, chosen, weights = original_route(self, h)
        real = self.real if self.real is not None and self.real.numel() == h.shape[0] else h.new_ones(h.shape[0])
        keep = real.bool()
        routed.append((torch.is_grad_enabled() and self.training, probs[keep].detach(), chosen[keep]))
        return probs, chosen, weights

    monkeypatch.setattr(MoEFeedForward, "route", route)
    recipe = moe_recipe(tiny_lm_dir, tiny_clip_dir, world)
    assert recipe.stages[1].grad_accum == 1  # so each step's loss_moe_aux is one forward's balancing loss
    trainer = Trainer(recipe, tmp_path / "run", progress=False)
    trainer.run()
    model = trainer.model.eval()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".mlp.experts." in n or ".mlp.router." in n for n in trained)
    assert all(n.startswith("lm.model.layers.1.") for n in trained)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stage2 = [r for r in rows if r["stage"] == "multitask"]
    trained_forwards = [(p, c) for train, p, c in routed if train]  # one MoE layer: one route per forward
    assert len(stage2) == len(trained_forwards) == 3
    for r, (probs, chosen) in zip(stage2, trained_forwards):  # E · Σ_e f_e · P_e, from the router's own outputs
        want = balancing_loss(probs, torch.bincount(chosen.reshape(-1), minlength=3), 2).item()
        # logged rounded to 6 places (5e-7); fp32 sums over <= 4 x 160 tokens differ by <= 640 * 2^-24 < 1e-4 rel
        assert r["loss_moe_aux"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    experts = moe_layers(model)[0].experts
    assert not torch.equal(experts[0].down_proj.weight, experts[1].down_proj.weight)  # experts moved apart
    ids = torch.tensor(
        [
            trainer.processor.encode(
                [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}], 1
            ).input_ids
        ]
    )
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        routed.clear()
        want = model(ids, pixel_values=pixels).hidden_states
        want_aux = aux_loss(model.lm)
        loaded, _ = load_run(tmp_path / "run")
        got = loaded(ids, pixel_values=pixels).hidden_states
        got_aux = aux_loss(loaded.lm)
    assert len(moe_layers(loaded.lm)) == 1
    assert torch.equal(want, got)
    (_, probs, chosen), (_, probs2, chosen2) = routed  # the trained model's forward, then the reloaded one's
    assert probs.shape[0] == ids.shape[1] and torch.equal(probs, probs2) and torch.equal(chosen, chosen2)
    # the same forward's tally gives the balancing loss computed directly (fp32 sums over T tokens, differing order)
    assert got_aux.item() == pytest.approx(
        balancing_loss(probs, torch.bincount(chosen.reshape(-1), minlength=3), 2).item(), rel=1e-5
    )
    assert torch.equal(got_aux, want_aux)


def test_flops_count_top_k_experts_not_all(tiny):
    import copy

    model = copy.deepcopy(tiny[0]).requires_grad_(False)
    batch = {
        "input_ids": torch.ones(1, 10, dtype=torch.long),
        "labels": torch.full((1, 10), -100),
        "attention_mask": torch.ones(1, 10, dtype=torch.long),
    }
    dense = StepFlops(model)(batch)
    moe = copy.deepcopy(model)
    add_moe(moe.lm, experts=4, top_k=2, layers="all")
    moe.requires_grad_(False)
    mlp = moe.lm.model.layers[0].mlp.experts[0]
    ffn_flops = 2 * 2 * sum(m.in_features * m.out_features for m in mlp.modules() if isinstance(m, nn.Linear))
    router_flops = 2 * 2 * 64 * 4
    # per token and layer: 2 of the 4 experts (one FFN's worth twice) plus the router, all frozen (×2 fwd+bwd)
    assert StepFlops(moe)(batch) - dense == 10 * 2 * (ffn_flops + router_flops)


# -- MoE-LLaVA's DeepSpeed gate options ------------------------------------------------------------------------
def logit_layer(experts=3, top_k=2, **gate):
    """A layer whose router logits are its input (hidden size = E, router = identity) and whose experts differ."""
    torch.manual_seed(0)
    layer = MoEFeedForward(nn.Linear(experts, experts), experts, experts, top_k, **gate)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(experts))
        for e in layer.experts:
            nn.init.normal_(e.weight)
    return layer


def test_gumbel_second_expert_is_sampled_by_the_gumbel_max_rule_in_training_only():
    layer = logit_layer(experts=4, second="gumbel")
    n = 20000
    x = torch.tensor([3.0, 1.0, 0.0, 0.0]).expand(n, 4)
    torch.manual_seed(1)
    probs, chosen, weights = layer.route(x)
    assert (chosen[:, 0] == 0).all()  # the first expert is the plain argmax
    # Gumbel-max: the second is expert j != 0 with probability softmax over the others, e^1/(e^1+2) for j = 1
    p1 = torch.e / (torch.e + 2)
    share = (chosen[:, 1] == 1).float().mean().item()
    assert abs(share - p1) < 5 * (p1 * (1 - p1) / n) ** 0.5  # 5 standard deviations of a binomial share
    assert set(chosen[:, 1].tolist()) == {1, 2, 3}
    # the weights are the two chosen softmax gates renormalised (no noise in them)
    want = probs.gather(1, chosen)
    torch.testing.assert_close(weights, want / want.sum(1, keepdim=True), rtol=0, atol=2 * 2**-24)
    layer.eval()
    assert torch.equal(layer.route(x[:5])[1], torch.tensor([[0, 1]] * 5))  # eval: the plain second best


def test_top1_balance_term_counts_first_choices_only():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.5, 0.4], [0.45, 0.1, 0.45], [0.3, 0.3, 0.4]])
    chosen = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 0]])
    # DeepSpeed top-2: me = mean(gates) = (0.3375, 0.3, 0.3625), ce = mean(mask1) = (2/4, 1/4, 1/4)
    want = 3 * (0.3375 * 0.5 + 0.3 * 0.25 + 0.3625 * 0.25)
    t = tally(probs, chosen[:, :1])
    got = balancing_over(t, t).item()
    assert got == pytest.approx(want, rel=4 * 2**-24 * 3)  # a few fp32 roundings over 3 summed terms
    layer = logit_layer(balance="top1")
    x = torch.randn(7, 3)
    layer(x)
    p = x.softmax(-1)
    mask1 = nn.functional.one_hot(p.argmax(-1), 3).float()
    want = 3 * (p.mean(0) * mask1.mean(0)).sum().item()
    assert balancing_over(layer.tally, layer.tally).item() == pytest.approx(want, rel=8 * 7 * 2**-24)


def by_hand_capacity(x, layer, cap):
    """DeepSpeed's top-2 rule written out: queue every token's first choice in token order, then every second
    choice; an expert takes the first `cap` of its queue; a token's kept gates are renormalised."""
    probs = x.softmax(-1)
    picks = [probs[t].topk(2).indices.tolist() for t in range(len(x))]
    taken = [0] * layer.num_experts
    kept = [[False, False] for _ in picks]
    for j in range(2):
        for t, pick in enumerate(picks):
            e = pick[j]
            if taken[e] < cap:
                kept[t][j] = True
            taken[e] += 1
    out = torch.zeros_like(x)
    for t, pick in enumerate(picks):
        gates = [probs[t, e].item() if k else 0.0 for e, k in zip(pick, kept[t])]
        total = sum(gates)
        for e, g in zip(pick, gates):
            if g:
                out[t] += g / total * layer.experts[e](x[t])
    return out, kept


def test_capacity_drops_overflow_assignments_in_deepspeed_order_and_renormalises():
    layer = logit_layer(capacity_factor=0.5, eval_capacity_factor=1.0)
    # 6 tokens, 3 experts, top 2: capacity ceil(6 / 3 * 0.5 * 2) = 2 while training, ceil(6 / 3 * 1.0 * 2) = 4 in eval
    x = torch.tensor([[3.0, 2, 0], [3, 0, 2], [3, 2, 0], [0, 3, 2], [2, 3, 0], [0, 2, 3]])
    assert layer.capacity(6) == 2
    want, kept = by_hand_capacity(x, layer, 2)
    # first choices 0,0,0,1,1,2: expert 0 takes tokens 0, 1 (token 2 overflows), expert 1 tokens 3, 4, expert 2
    # token 5; then second choices 1,2,1,2,0,1: only token 1's (expert 2, one place left) fits
    assert kept == [[True, False], [True, True], [False, False], [True, False], [True, False], [True, False]]
    got = layer(x)
    assert torch.equal(got[2], torch.zeros(3))  # both choices dropped: the residual alone carries token 2
    torch.testing.assert_close(got, want, rtol=0, atol=4 * 3 * 2**-24 * want.abs().max().item())
    layer.eval()
    assert layer.capacity(6) == 4 and layer.capacity(10) == 7  # ceil(10 / 3 * 2) = 7
    layer.min_capacity = 9
    assert layer.capacity(6) == 9
    layer.min_capacity, layer.eval_capacity_factor = 0, None
    assert layer.capacity(6) == 2  # no eval factor: the training one
    # padding takes no place in a queue: marked padding does not change the real tokens' outputs
    layer.train()
    padded = torch.cat([torch.tensor([[0.0, 3, 2]] * 3), x])
    layer.real = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1])
    torch.testing.assert_close(layer(padded)[3:], want, rtol=0, atol=4 * 3 * 2**-24 * want.abs().max().item())


def test_released_script_option_trains_the_dense_ffns_too():
    dense, expert = "lm.model.layers.1.mlp.down_proj.weight", "lm.model.layers.0.mlp.experts.2.up_proj.weight"
    router, attn = "lm.model.layers.0.mlp.router.weight", "lm.model.layers.1.self_attn.q_proj.weight"
    assert [is_moe_param(n) for n in (dense, expert, router, attn)] == [False, True, True, False]
    assert [is_moe_param(n, ffn=True) for n in (dense, expert, router, attn)] == [True, True, True, False]


def test_train_ffn_stage_trains_routers_experts_and_the_dense_ffns(tiny):
    import copy

    from mmbridge.config import MoeConfig, StageConfig
    from mmbridge.train.parts import apply_stage_modes

    model = copy.deepcopy(tiny[0])
    stage = StageConfig(
        train={"vision": "frozen", "bridge": "frozen", "lm": "moe"},
        lr={"lm": 1e-3},
        moe=MoeConfig(
            experts=2,
            layers="every_other",
            train_ffn=True,
            capacity_factor=1.5,
            eval_capacity_factor=2.0,
            second="gumbel",
            balance="top1",
        ),
    )
    apply_stage_modes(model, stage)
    saved = moe_settings(model.lm)  # what the run's meta keeps, read back from the layers
    assert saved["capacity_factor"] == 1.5 and saved["second"] == "gumbel" and saved["balance"] == "top1"
    assert saved["layers"] == chosen_layers(model.lm.config.num_hidden_layers, "every_other") and (
        saved["experts"],
        saved["top_k"],
    ) == (stage.moe.experts, stage.moe.top_k)
    first = moe_layers(model.lm)[0]
    assert (first.capacity_factor, first.eval_capacity_factor, first.balance) == (1.5, 2.0, "top1")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".layers.1.mlp.down_proj." in n for n in trained)  # layer 1 stays dense, and trains
    assert any(".layers.0.mlp.experts.1." in n for n in trained) and any(".mlp.router." in n for n in trained)
    assert all(".mlp." in n for n in trained)


def test_bundled_moe_llava_recipe_is_valid():
    from mmbridge.config import load_recipe

    r = load_recipe("moe_llava")
    assert [s.name for s in r.stages] == ["align", "instruct", "moe"]
    assert r.stages[0].train == {"vision": "frozen", "bridge": "full", "lm": "frozen"}
    assert r.stages[1].train["lm"] == "full"
    moe = r.stages[2]
    assert moe.train["lm"] == "moe" and moe.lr == {"lm": 2.0e-5} and "text_only" in moe.data
    assert (
        moe.moe.second,
        moe.moe.balance,
        moe.moe.capacity_factor,
        moe.moe.eval_capacity_factor,
        moe.moe.train_ffn,
    ) == ("gumbel", "top1", 1.5, 2.0, True)
