"""The seeds' claims measured with mmbridge: each claim's arms at equal compute, several seeds, the spread, a verdict.

    python benchmarks/fidelity.py --claims croc --seeds 0 1 2 --budgets 120       # one claim, three seeds
    python benchmarks/fidelity.py                  # every claim, seeds 0 1 2, each claim's default budgets
    python benchmarks/fidelity.py --smoke          # every claim on tiny models and world, one step per stage

Every (claim, arm, seed, budget) is one whole training run; its figures are appended to OUT/results.jsonl as
soon as it finishes, and a later call with the same OUT skips what is there (an interrupted run continues).
The multimodal claims start from the bundled demo recipe (EfficientNet-Lite0 at 64 px, the lexical alignment
stage with the encoder frozen, SmolLM2-135M with LoRA): their arms differ only where the claim says, and `budget` is the number of LM
steps after the alignment stage, shared by the arms however they split it. LCL and high resolution run the
recipes of `benchmarks/lcl_table1.py` and `benchmarks/highres.py` with a seed.

The verdict for a claim "A > B" on a figure: reproduced when every seed of A is above every seed of B,
not reproduced when every seed of A is below every seed of B, otherwise not distinguished (the min–max
spreads overlap); "A >= B" is reproduced unless A is below B. A claim of several pairs is reproduced when
every pair is, not reproduced when any pair is reversed. A figure where every seed of every arm stays within two
standard errors of a proportion above the blind baseline (over the figure's test items) is not measured: no arm
learned it, so its order says nothing.

Prints one JSON line per claim and budget, then every claim's summary as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import step_costs, tiny_models, tiny_sets, tiny_world  # noqa: E402

SMOKE_KEYS = ("benchmark", "smoke", "claims")
FAST_EVAL = ["eval.caption.limit=50", "eval.vqa.limit=200", "eval.grounding.limit=100"]
LMM_ITEMS = {"vqa_accuracy": 200, "grounding_acc50": 100}  # the test items FAST_EVAL scores
BASE = ["model.vision.image_size=64"]  # 16 tokens per image (a claim may set its own size after this)
HIGHRES_ALIGN = 200  # lexical alignment steps before high resolution's LM budget (each image's views one bag)
LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "layers": 15}


@dataclass(frozen=True)
class Claim:
    """A published claim: `pairs` of (arm, ">" or ">=", arm) on each figure of `figures` (higher is better)."""

    name: str
    says: str
    arms: tuple[str, ...]
    pairs: tuple[tuple[str, str, str], ...]
    figures: tuple[str, ...]
    run: Callable[..., dict]  # run(arm, seed, budget, out, smoke) -> figures
    budgets: tuple[int, ...]
    cost: tuple[str, ...] = field(default=())  # figures that tell what an arm costs
    items: dict[str, int] = field(default_factory=dict)  # test items behind each accuracy figure (for the floor)
    run_per_seed: bool = False  # one run trains every arm of a seed (its time is the seed's, not an arm's)


# -- verdicts ------------------------------------------------------------------------------------------
def spread(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def compare_pair(a: list[float], relation: str, b: list[float]) -> str:
    """`held`, `reversed` or `overlap` for the claim `a relation b` over seeds (min–max spreads)."""
    if min(a) > max(b):
        return "held"
    if max(a) < min(b):
        return "reversed"
    return "held" if relation == ">=" else "overlap"


def noise_floor(blind: float, items: int) -> float:
    """Two standard errors of a proportion above the blind baseline over `items` test items (the proportion
    taken as at least one item, so a blind score of 0 still has a floor)."""
    p = max(blind, 1.0 / items)
    return blind + 2.0 * math.sqrt(p * (1.0 - p) / items)


def verdict(pairs: tuple[tuple[str, str, str], ...], values: dict[str, list[float]], floor: float | None = None) -> str:
    """The claim's verdict over min–max spreads; `not measured` when every seed of every arm stays at or below
    `floor` (no arm learned the figure, so the comparison says nothing)."""
    if floor is not None and all(max(v) <= floor for v in values.values()):
        return "not measured"
    states = [compare_pair(values[a], rel, values[b]) for a, rel, b in pairs]
    if "reversed" in states:
        return "not reproduced"
    return "reproduced" if all(s == "held" for s in states) else "not distinguished"


# -- the multimodal claims, on the demo recipe -----------------------------------------------------------
def demo_stages() -> list[dict]:
    from mmbridge.config import __file__ as config_file

    return yaml.safe_load((Path(config_file).parent / "recipes" / "demo.yaml").read_text())["stages"]


def align_stage() -> dict:
    """The lexical alignment as the demo ran it until 2026-12-07 (64 px, the encoder frozen and its features
    cached: about a minute), the same for every arm; pinned here so that runs added later match the first ones."""
    return {
        **demo_stages()[0],
        "objective": {"name": "lexical", "words": 48},
        "train": {"vision": "frozen", "bridge": "full", "lm": "frozen"},
        "lr": {"bridge": 5.0e-3},
        "steps": 600,
        "batch_size": 64,
    }


def lm_stage(steps: int, **change) -> dict:
    """The demo's multitask stage (LoRA, the bridge frozen) with `steps` and `change`."""
    stage = {**demo_stages()[1], "steps": steps}
    stage.update(change)
    return stage


def stages_override(stages: list[dict], seed: int, smoke: bool) -> str:
    """The recipe's stages, each seeded with `seed` (LoRA and objective initialisation, batch order); at toy
    size one step of 2 samples each, LoRA in every layer of the tiny LM."""
    stages = [{**s, "seed": seed} for s in stages]
    if smoke:
        for s in stages:
            s.update(steps=1, batch_size=2)
            if "lora" in s:
                s["lora"] = {k: v for k, v in s["lora"].items() if k != "layers"}
    return "stages=" + json.dumps(stages)


def run_lmm(overrides: list[str], out: Path, smoke: bool) -> dict:
    """A whole demo-pipeline run with `overrides`; the held-out figures, the blind baselines and the time."""
    from mmbridge.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        extra = []
        if smoke:
            extra = [
                *tiny_sets(tiny_models(tmp), tiny_world(tmp)),
                "eval.caption.limit=2",
                "eval.vqa.limit=8",
                "eval.grounding.limit=2",
            ]
        m = run_demo(out=str(out), overrides=[*BASE, *FAST_EVAL, *extra, *overrides], export=False)
    base = json.loads((out / "metrics.json").read_text())["baselines"]
    row = {k: m[k] for k in ("cider", "vqa_accuracy", "grounding_acc50", "unparsed", "vqa_image_gain") if k in m}
    row |= {f"vqa_{k}": v for k, v in m.get("vqa_by_qtype", {}).items()}
    row |= {f"blind_{k}": v for k, v in base.items() if isinstance(v, (int, float))}
    row |= step_costs(out / "metrics.jsonl")
    row["train_seconds"] = m["train_seconds"]
    return row


def croc_run(arm: str, seed: int, budget: int, out: Path, smoke: bool) -> dict:
    """Croc (stage 1.5): a third of the LM budget on detailed captions, with Croc's objective or plain next-token
    loss, then the rest on the demo's instruction mix; the aligned projector stays frozen in both."""
    first = budget // 3
    rest = budget - budget // 3
    middle = lm_stage(first, name="comprehension", data={"world/train/detailed": 1.0}, group_by_length=0)
    if arm == "croc":
        middle["objective"] = {
            "name": "croc",
            "pool_size": 2048,
            "mask_ratio": 0.75,
            "matching": "hungarian",
            "attention": "prefix",
            "target": "all",
            "recon_weight": 10.0,
            "beta": 0.01,
            "allow_unnormalised": True,  # the aligned projector's tokens sit at the word embeddings' scale
        }
        middle["lr"] = {**middle["lr"], "objective": 1.0e-3}
    stages = [align_stage(), middle, lm_stage(rest)]
    return run_lmm([f"seed={seed}", stages_override(stages, seed, smoke)], out, smoke)


BRIDGE_ARMS = {
    # 128 px: an 8x8 grid of block-7 features, 16 tokens per image from each bridge
    "pool_adapter": {"name": "pool_adapter", "pooled": 4, "act": "sigmoid"},
    "resampler": {"name": "resampler", "latents": 16},
    "qformer": {"name": "qformer", "queries": 16},
}


def infmllm_run(arm: str, seed: int, budget: int, out: Path, smoke: bool) -> dict:
    """InfMLLM's pool-adapter against query-based bridges: each aligned by the lexical stage (the encoder frozen,
    so every arm sees the same features), then the demo's LM stage with the bridge frozen."""
    align = align_stage()
    align["lr"]["objective"] = 1.0e-2  # a token-read bridge's word scale and offsets
    stages = [align, lm_stage(budget)]
    size = [] if smoke else ["model.vision.image_size=128"]
    return run_lmm(
        [f"seed={seed}", *size, "model.bridge=" + json.dumps(BRIDGE_ARMS[arm]), stages_override(stages, seed, smoke)],
        out,
        smoke,
    )


def moe_run(arm: str, seed: int, budget: int, out: Path, smoke: bool) -> dict:
    """MoE-tuning against dense tuning at equal active parameters: half the LM budget with LoRA (the demo's
    stage), then the other half either converts every other FFN into 4 experts routed top-1 (one expert's
    parameters active per token, as in the dense FFN) and trains experts and routers, or trains the dense LM."""
    half = budget // 2
    third = lm_stage(half, name="moe" if arm == "moe" else "dense", lr={"lm": 2.0e-5})
    third.pop("lora", None)
    if arm == "moe":
        third["train"] = {"vision": "frozen", "bridge": "frozen", "lm": "moe"}
        third["moe"] = {"experts": 4, "top_k": 1, "layers": "every_other", "aux_weight": 0.01, "train_ffn": True}
    else:
        third["train"] = {"vision": "frozen", "bridge": "frozen", "lm": "full"}
    stages = [align_stage(), lm_stage(half), third]
    return run_lmm([f"seed={seed}", stages_override(stages, seed, smoke)], out, smoke)


# -- LCL and high resolution, through their benchmarks ---------------------------------------------------
def lcl_run(arm: str, seed: int, budget: int, out: Path, smoke: bool) -> dict:
    import lcl_table1

    cached = out.parent / f"table-s{seed}-b{budget}.json"  # one table per seed holds every arm and the init
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        argv = ["--steps", str(budget), "--out", str(out.parent / f"runs-s{seed}-b{budget}")]
        argv += ["--threads", os.environ.get("OMP_NUM_THREADS", "2")]
        argv += ["--set", f"seed={seed}", "--set", f"stages.0.seed={seed}"]
        table = lcl_table1.main([*argv, *(["--smoke"] if smoke else [])])
        cached.write_text(json.dumps(table))
    row = json.loads(cached.read_text())["rows"][arm]
    return {k: v for k, v in row.items() if isinstance(v, (int, float))}


def highres_run(arm: str, seed: int, budget: int, out: Path, smoke: bool) -> dict:
    import highres

    argv = ["--variants", arm, "--steps", str(budget), "--out", str(out), "--seed", str(seed)]
    argv += ["--align-steps", str(HIGHRES_ALIGN)]
    argv += ["--threads", os.environ.get("OMP_NUM_THREADS", "1")]
    table = highres.main([*argv, *(["--smoke"] if smoke else [])])
    row = table["rows"][arm]
    base = table["blind_baselines"]
    return {k: v for k, v in row.items() if isinstance(v, (int, float))} | {
        f"blind_{k}": v for k, v in base.items() if isinstance(v, (int, float))
    }


CLAIMS = {
    c.name: c
    for c in (
        Claim(
            "croc",
            "a cross-modal comprehension stage (prompt pool, Hungarian matching, mixed attention, reconstruction) "
            "before instruction tuning beats the same budget on detailed captions",
            ("croc", "captions"),
            (("croc", ">", "captions"),),
            ("vqa_accuracy", "grounding_acc50"),
            croc_run,
            (120,),
            cost=("lm_step_s_median", "train_seconds"),
            items=LMM_ITEMS,
        ),
        Claim(
            "infmllm",
            "the pool-adapter, which keeps where each token came from, grounds better than query-based bridges",
            ("pool_adapter", "qformer", "resampler"),
            (("pool_adapter", ">", "qformer"), ("pool_adapter", ">", "resampler")),
            ("grounding_acc50", "vqa_accuracy"),
            infmllm_run,
            (120,),
            cost=("lm_step_s_median", "train_seconds"),
            items=LMM_ITEMS,
        ),
        Claim(
            "lcl",
            "LCL >= contrastive-only >> generation-only pretraining of the vision encoder, on a linear probe",
            ("lcl", "contrastive", "generation", "random_init"),
            (("lcl", ">=", "contrastive"), ("contrastive", ">", "generation"), ("generation", ">", "random_init")),
            ("probe_mean",),
            lcl_run,
            (200, 400),
            cost=("train_s",),
            run_per_seed=True,
        ),
        Claim(
            "highres",
            "AnyRes / UHD read small shapes in large images better than one resize",
            ("anyres", "uhd", "resize"),
            (("anyres", ">", "resize"), ("uhd", ">", "resize")),
            ("vqa_accuracy", "grounding_acc50"),
            highres_run,
            (60, 120),
            cost=("visual_tokens", "lm_step_s_median", "train_s"),
            items={"vqa_accuracy": 40, "grounding_acc50": 20},  # highres.py's default test sizes
        ),
        Claim(
            "moe",
            "MoE-tuning beats dense tuning at equal active parameters and equal steps",
            ("moe", "dense"),
            (("moe", ">", "dense"),),
            ("vqa_accuracy", "grounding_acc50"),
            moe_run,
            (120,),
            cost=("lm_step_s_median", "train_seconds"),
            items=LMM_ITEMS,
        ),
    )
}


# -- the driver ------------------------------------------------------------------------------------------
def read_results(path: Path) -> dict[tuple, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["claim"], r["arm"], r["seed"], r["budget"])] = r
    return done


def summarise(claim: Claim, budget: int, rows: dict[tuple, dict], seeds: list[int]) -> dict:
    out = {"claim": claim.name, "says": claim.says, "budget": budget, "seeds": seeds, "figures": {}}
    for fig in claim.figures:
        values = {a: [rows[(claim.name, a, s, budget)]["figures"][fig] for s in seeds] for a in claim.arms}
        blind = rows[(claim.name, claim.arms[0], seeds[0], budget)]["figures"].get(f"blind_{fig}")
        floor = noise_floor(blind, claim.items[fig]) if blind is not None and fig in claim.items else None
        out["figures"][fig] = {
            "arms": {a: spread(v) for a, v in values.items()},
            # each pair's difference of means: how a gap moves from one budget to the next
            "gaps": {
                f"{a} - {b}": round(statistics.fmean(values[a]) - statistics.fmean(values[b]), 4)
                for a, _, b in claim.pairs
            },
            "floor": None if floor is None else round(floor, 4),
            "verdict": verdict(claim.pairs, values, floor),
        }
    first = rows[(claim.name, claim.arms[0], seeds[0], budget)]["figures"]
    out["blind"] = {f: first[f"blind_{f}"] for f in claim.figures if f"blind_{f}" in first}
    out["cost"] = {
        a: {
            c: spread([rows[(claim.name, a, s, budget)]["figures"][c] for s in seeds])
            for c in claim.cost
            if rows[(claim.name, a, seeds[0], budget)]["figures"].get(c) is not None
        }
        for a in claim.arms
    }
    if claim.run_per_seed:  # the first arm's row holds the whole run's time, the others the time to read it back
        out["seconds_per_seed"] = spread(
            [sum(rows[(claim.name, a, s, budget)]["seconds"] for a in claim.arms) for s in seeds]
        )
    else:
        out["seconds_per_run"] = spread(
            [rows[(claim.name, a, s, budget)]["seconds"] for a in claim.arms for s in seeds]
        )
    return out


def markdown(summary: dict) -> str:
    """One row per claim, budget and figure: each arm's mean (min–max), the blind baseline with its noise floor,
    the verdict."""
    lines = [
        "| claim | budget | figure | arms: mean (min–max) over seeds | gap of means | blind | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for line in summary.values():
        for fig, v in line["figures"].items():
            arms = "; ".join(f"{a} {s['mean']:.3f} ({s['min']:.3f}–{s['max']:.3f})" for a, s in v["arms"].items())
            b = f"{line['blind'][fig]:.3f}" if fig in line["blind"] else ""
            b += f" (floor {v['floor']:.3f})" if v.get("floor") is not None else ""
            gaps = "; ".join(f"{pair} {g:+.3f}" for pair, g in v["gaps"].items())
            lines.append(f"| {line['claim']} | {line['budget']} | {fig} | {arms} | {gaps} | {b} | {v['verdict']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--claims", nargs="+", default=list(CLAIMS), choices=list(CLAIMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budgets", type=int, nargs="+", help="steps per arm (default: each claim's own)")
    ap.add_argument("--arms", nargs="+", help="run only these arms (the summary needs every arm)")
    ap.add_argument("--out", default="runs/fidelity", help="where the runs go")
    ap.add_argument("--results", help="the JSONL record of finished runs (default: OUT/results.jsonl)")
    ap.add_argument("--smoke", action="store_true", help="tiny models and world, one step per stage, seeds 0 1")
    ap.add_argument("--markdown", action="store_true", help="also print the finished claims as a Markdown table")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.out, args.seeds = str(Path(tmp) / "fidelity"), args.seeds[:2]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results = Path(args.results) if args.results and not args.smoke else out / "results.jsonl"
        results.parent.mkdir(parents=True, exist_ok=True)
        rows = read_results(results)
        summary = {}
        for name in args.claims:
            claim = CLAIMS[name]
            budgets = [1] if args.smoke else (args.budgets or list(claim.budgets))
            for budget in budgets:
                for seed in args.seeds:
                    for arm in args.arms or claim.arms:
                        if arm not in claim.arms:
                            continue
                        key = (name, arm, seed, budget)
                        if key in rows:
                            continue
                        print(f"fidelity: {name} / {arm} / seed {seed} / budget {budget}", flush=True)
                        t0 = time.time()
                        figures = claim.run(arm, seed, budget, out / name / f"{arm}-s{seed}-b{budget}", args.smoke)
                        row = {
                            "claim": name,
                            "arm": arm,
                            "seed": seed,
                            "budget": budget,
                            "figures": figures,
                            "seconds": round(time.time() - t0, 1),
                        }
                        with results.open("a") as fh:
                            fh.write(json.dumps(row) + "\n")
                        rows[key] = row
                if all((name, a, s, budget) in rows for a in claim.arms for s in args.seeds):
                    line = summarise(claim, budget, rows, args.seeds)
                    summary[f"{name}@{budget}"] = line
                    print(json.dumps(line), flush=True)
    if args.markdown:
        print(markdown(summary))
    table = {"benchmark": "fidelity", "smoke": args.smoke, "claims": summary}
    print(json.dumps(table))
    return table


if __name__ == "__main__":
    main()
