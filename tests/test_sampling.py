"""`MultimodalLM.generate` beyond greedy: temperature / top-p sampling with per-row generators, and the
per-token callback that streams tokens and ends rows early."""

from __future__ import annotations

import pytest
import torch

from mmbridge.models.sampling import top_p_filter
from tests.conftest import Choices


@pytest.fixture(scope="module")
def prompts(tiny):
    """Two left-padded prompts with one image each."""
    _, proc = tiny
    seqs = [
        proc.encode_prompt([{"from": "human", "value": "<image>\nColour?"}]),
        proc.encode_prompt([{"from": "human", "value": "<image>\nHow many shapes are in this picture?"}]),
    ]
    ids = proc.pad(seqs, proc.pad_id, left=True)
    lengths = torch.tensor([len(s) for s in seqs])
    mask = (torch.arange(ids.shape[1])[None] >= ids.shape[1] - lengths[:, None]).long()
    return ids, mask, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.2, 0.5, 0.3])
    assert torch.allclose(top_p_filter(probs, 0.6), torch.tensor([0.0, 0.625, 0.375]))
    assert torch.equal(top_p_filter(probs, 0.5), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_same_seed_same_tokens_and_sampling_differs_from_greedy(tiny, prompts):
    model, _ = tiny
    ids, mask, pixels = prompts
    greedy = model.generate(ids, mask, pixels, max_new_tokens=8)
    a = model.generate(ids, mask, pixels, max_new_tokens=8, temperature=1.5, generator=seeded(7))
    b = model.generate(ids, mask, pixels, max_new_tokens=8, temperature=1.5, generator=seeded(7))
    assert a == b
    others = [
        model.generate(ids, mask, pixels, max_new_tokens=8, temperature=1.5, generator=seeded(s)) for s in range(3)
    ]
    assert any(o != greedy for o in [a, *others])
    assert len({str(o) for o in [a, *others]}) > 1  # the seed matters


def test_a_tiny_nucleus_is_greedy(tiny, prompts):
    model, _ = tiny
    ids, mask, pixels = prompts
    with Choices(model) as choices:
        greedy = model.generate(ids, mask, pixels, max_new_tokens=8)
    choices.assert_clear()  # no near-tie that argmax and the nucleus's sort could break differently
    assert (
        model.generate(ids, mask, pixels, max_new_tokens=8, temperature=2.0, top_p=1e-6, generator=seeded(0)) == greedy
    )


def test_rows_sample_with_their_own_settings(tiny, prompts):
    """Row 0 greedy, row 1 sampled with its own generator: row 0 is the greedy reply, and row 1 draws what the
    same generator draws for it beside a row sampling from another generator. (Compared in one batch shape, so
    with the same arithmetic: unlike a greedy choice, a draw's closeness to a tie cannot be bounded from outside.)"""
    model, _ = tiny
    ids, mask, pixels = prompts
    greedy = model.generate(ids, mask, pixels, max_new_tokens=8)
    mixed = model.generate(ids, mask, pixels, max_new_tokens=8, temperature=[0.0, 1.5], generator=[None, seeded(3)])
    beside = model.generate(ids, mask, pixels, max_new_tokens=8, temperature=1.5, generator=[seeded(4), seeded(3)])
    assert mixed[0] == greedy[0]
    assert mixed[1] == beside[1] and beside[0] != greedy[0]
    with pytest.raises(ValueError, match="temperature: 3 values for 2 rows"):
        model.generate(ids, mask, pixels, temperature=[0.0, 1.0, 1.0])


def test_on_token_streams_every_token_and_ends_flagged_rows(tiny, prompts):
    model, _ = tiny
    ids, mask, pixels = prompts
    greedy = model.generate(ids, mask, pixels, max_new_tokens=8)
    seen = []

    def on_token(tokens):
        seen.append(tokens)
        return [len(seen) == 3, False]  # end row 0 after its third token

    got = model.generate(ids, mask, pixels, max_new_tokens=8, on_token=on_token)
    assert got == [greedy[0][:3], greedy[1]]
    assert [s[0] for s in seen[:3]] == greedy[0][:3] and all(s[0] is None for s in seen[3:])
    assert [s[1] for s in seen] == greedy[1]


def test_on_token_reports_the_stop_token_then_none(tiny, prompts):
    """A row that produces a stop token is reported once with it, then with None; the result excludes it."""
    model, _ = tiny
    ids, mask, pixels = prompts
    greedy = model.generate(ids, mask, pixels, max_new_tokens=8)
    stop = greedy[1][2]
    seen = []
    got = model.generate(ids, mask, pixels, max_new_tokens=8, eos_token_ids=[stop], on_token=seen.append)
    cut = greedy[1].index(stop)
    assert got[1] == greedy[1][:cut]
    assert [s[1] for s in seen][: cut + 1] == greedy[1][: cut + 1]
    assert all(s[1] is None for s in seen[cut + 1 :])


def test_tiny_temperatures_are_greedy_and_non_finite_settings_are_refused():
    """A temperature whose 1/t overflows float32 (1e-300 divides the logits by 0) chose NaN probabilities, and
    `torch.multinomial` raised for the whole batch, its greedy rows too (issue #29). Such a row is now greedy;
    NaN, infinite or negative settings raise before any row is chosen."""
    from mmbridge.models.sampling import GREEDY_BELOW, next_tokens

    logits = torch.randn(3, 50, generator=seeded(0))
    tokens = next_tokens(logits, [0.0, 1e-300, GREEDY_BELOW / 2], [1.0, 1.0, 0.5], [None, seeded(1), seeded(2)])
    assert tokens.tolist() == logits.argmax(-1).tolist()
    for t, p in [(float("nan"), 1.0), (float("inf"), 1.0), (-1.0, 1.0), (1.0, float("nan")), (1.0, 0.0), (1.0, 1.5)]:
        with pytest.raises(ValueError, match="temperature|top_p"):
            next_tokens(logits[:1], [t], [p], [None])
