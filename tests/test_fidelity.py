"""The fidelity report's verdicts: a claim is reproduced only when every seed of one arm clears every seed of the
other, reversed only when every seed falls below; overlapping spreads are not distinguished."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fidelity import CLAIMS, compare_pair, markdown, noise_floor, spread, summarise, verdict  # noqa: E402


@pytest.mark.parametrize(
    "a,relation,b,want",
    [
        ([0.6, 0.7], ">", [0.4, 0.5], "held"),
        ([0.6, 0.7], ">", [0.5, 0.65], "overlap"),
        ([0.6, 0.7], ">=", [0.5, 0.65], "held"),
        ([0.3, 0.4], ">", [0.5, 0.6], "reversed"),
        ([0.3, 0.4], ">=", [0.5, 0.6], "reversed"),
        ([0.5, 0.5], ">", [0.5, 0.5], "overlap"),  # ties are not a win
    ],
)
def test_a_pair_is_held_only_when_the_spreads_separate(a, relation, b, want):
    assert compare_pair(a, relation, b) == want


def test_a_claim_of_several_pairs():
    pairs = (("lcl", ">=", "con"), ("con", ">", "gen"))
    assert verdict(pairs, {"lcl": [0.7, 0.8], "con": [0.75, 0.78], "gen": [0.5, 0.6]}) == "reproduced"
    assert verdict(pairs, {"lcl": [0.7, 0.8], "con": [0.75, 0.78], "gen": [0.7, 0.9]}) == "not distinguished"
    assert verdict(pairs, {"lcl": [0.1, 0.2], "con": [0.75, 0.78], "gen": [0.5, 0.6]}) == "not reproduced"


def test_spread_and_every_claim_names_its_arms():
    assert spread([0.2, 0.4, 0.9]) == {"mean": 0.5, "min": 0.2, "max": 0.9, "n": 3}
    for claim in CLAIMS.values():
        named = {a for a, _, b in claim.pairs} | {b for _, _, b in claim.pairs}
        assert named <= set(claim.arms), claim.name
        assert all(rel in (">", ">=") for _, rel, _ in claim.pairs)


def test_arms_within_noise_of_the_blind_baseline_are_not_measured():
    # blind 0.02 over 100 items: two standard errors are 2 * sqrt(0.02 * 0.98 / 100) = 0.028
    floor = noise_floor(0.02, 100)
    assert math.isclose(floor, 0.02 + 2 * math.sqrt(0.02 * 0.98 / 100), rel_tol=1e-12)
    # a blind score of 0 still leaves a floor of one item's noise: p = 1/100
    assert math.isclose(noise_floor(0.0, 100), 2 * math.sqrt(0.01 * 0.99 / 100), rel_tol=1e-12)
    pairs = (("a", ">", "b"),)
    assert verdict(pairs, {"a": [0.04, 0.03], "b": [0.0, 0.01]}, floor) == "not measured"
    # one seed of one arm above the floor: the ordinary rule decides
    assert verdict(pairs, {"a": [0.2, 0.3], "b": [0.0, 0.01]}, floor) == "reproduced"
    assert verdict(pairs, {"a": [0.0, 0.01], "b": [0.2, 0.3]}, floor) == "not reproduced"
    assert verdict(pairs, {"a": [0.04, 0.03], "b": [0.0, 0.01]}) == "reproduced"  # no floor given


def test_the_multimodal_claims_name_their_test_items_for_the_floor():
    for name in ("croc", "infmllm", "moe", "highres"):
        claim = CLAIMS[name]
        assert set(claim.figures) <= set(claim.items), name


def _row(claim, arm, seed, value, seconds):
    return {"claim": claim, "arm": arm, "seed": seed, "budget": 1, "figures": {"probe_mean": value}, "seconds": seconds}


def test_a_claim_run_once_per_seed_reports_the_seeds_time_not_an_arms():
    # LCL trains every arm of a seed in one run: its first arm's row holds that run's time, the others ~0
    lcl = CLAIMS["lcl"]
    assert lcl.run_per_seed
    times = {0: [300.0, 0.1, 0.1, 0.1], 1: [500.0, 0.2, 0.2, 0.2]}
    rows = {
        ("lcl", a, s, 1): _row("lcl", a, s, 0.5 + 0.01 * i, times[s][i]) for s in (0, 1) for i, a in enumerate(lcl.arms)
    }
    out = summarise(lcl, 1, rows, [0, 1])
    # arms 0.50, 0.51, 0.52, 0.53 in each seed: lcl - contrastive, contrastive - generation, generation - random
    gaps = out["figures"]["probe_mean"]["gaps"]
    assert gaps == {"lcl - contrastive": -0.01, "contrastive - generation": -0.01, "generation - random_init": -0.01}
    row = markdown({"lcl@1": out}).splitlines()[-1]
    assert "| lcl 0.500 (0.500–0.500); contrastive 0.510" in row and "| lcl - contrastive -0.010; " in row
    assert "seconds_per_run" not in out
    assert out["seconds_per_seed"]["min"] == 300.3
    assert out["seconds_per_seed"]["max"] == 500.6
    # a claim of one run per arm keeps the per-run spread
    croc = CLAIMS["croc"]
    rows = {
        ("croc", a, s, 1): {
            **_row("croc", a, s, 0.5, 60.0 * (s + 1)),
            "figures": {"vqa_accuracy": 0.5, "grounding_acc50": 0.1},
        }
        for s in (0, 1)
        for a in croc.arms
    }
    out = summarise(croc, 1, rows, [0, 1])
    assert out["seconds_per_run"] == {"mean": 90.0, "min": 60.0, "max": 120.0, "n": 4}


def test_step_costs_leave_the_alignment_out_of_the_lm_median(tmp_path):
    from fidelity import step_costs

    rows = [("lexical", 0.1)] * 5 + [("multitask", 2.0), ("multitask", 4.0), ("moe", 7.0)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"stage": st, "step_s": t}) + "\n" for st, t in rows) + '{"eval": 1}\n')
    got = step_costs(metrics)
    # a median over every step would be 0.1 (the alignment's); the LM stages' is that of 2, 4 and 7
    assert got == {"step_s_lexical": 0.1, "step_s_multitask": 3.0, "step_s_moe": 7.0, "lm_step_s_median": 4.0}
