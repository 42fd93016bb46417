"""The GPU check: what `make test` cannot check on a CPU, in one script, under 8 minutes on one GPU.

1. `demo`: the bundled demo recipe as it is (whatever its vision, bridge, stages and objectives), a few steps
   per stage in one process on the device in bf16: the model and every batch are on the GPU, every stage
   ran, every loss is finite.
2. `adapter`: a LLaVA-style recipe of the check's own (EfficientNet-Lite0 + pool-adapter + SmolLM2; captions
   with the bridge alone, then captions, VQA and grounding with LoRA), as `demo`; the align loss falls.
3. `resume`: the demo run interrupted mid-stage and resumed gives the demo check's losses (|Δ| ≤ 1e-3
   relative on a GPU, bf16 kernels; ≤ 1e-6 on a CPU), CUDA RNG included.
4. `eval`: generation and `mmbridge eval --device` on the demo check's run, on the GPU.
5. `lcl`: a few LCL steps (our ViT from scratch + a small LM) through the same engine; loss falls, encoder
   exported.
6. `mfu`: a packed forward + backward + AdamW step at sequence length 2048 of a ~1.3B Llama-shaped LM built
   from a config (random weights, nothing downloaded) + a ViT-B/16 + the MLP bridge, bf16 autocast,
   through the trainer (packed rows take the flex_attention BlockMask path); median MFU of the timed
   steps against the GPU's datasheet peak (target 0.45 on an H100/H200).
7. `pytest_gpu`: the suite's GPU-only tests (CUDA RNG states in checkpoints).

    python benchmarks/gpu_check.py                        # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --smoke   # every check at toy sizes, on a CPU (a dry run)
    python benchmarks/gpu_check.py --smoke                # the same on the GPU if there is one

A check that needs another's run (`resume`, `eval` need `demo`'s) is reported as skipped, with the reason, when
that run is missing. --smoke runs every check on tiny models built from configs (`benchmarks/_common.py`) and a
small world. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mmbridge.config import load_recipe, recipe_from_dict  # noqa: E402
from mmbridge.device import resolve_device  # noqa: E402
from mmbridge.models.precision import autocast_dtype  # noqa: E402
from mmbridge.train.trainer import Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SMOLLM, smollm_tokenizer, tiny_models, tiny_sets, tiny_world, toy_stages  # noqa: E402

SMOKE_KEYS = ("benchmark", "device", "smoke", "all_ok", "checks")  # what the last JSON line holds (the smoke test)
ROOT = Path(__file__).resolve().parents[1]


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


class Interrupt(Exception):
    pass


def watched(trainer: Trainer, stop_at_call: int | None = None) -> dict:
    """Record the devices of every micro-batch's tensors; optionally interrupt at a micro-batch."""
    seen, original, calls = {"devices": set(), "batches": 0}, trainer._micro_batches, {"n": 0}

    def micro_batches(batches, stage):
        calls["n"] += 1
        if stop_at_call is not None and calls["n"] == stop_at_call:
            raise Interrupt
        out = original(batches, stage)
        for b in out[0]:
            seen["batches"] += 1
            seen["devices"] |= {str(v.device) for v in b.values() if torch.is_tensor(v)}
        return out

    trainer._micro_batches = micro_batches
    return seen


# -- the recipes each check trains ----------------------------------------------------------------------------
def demo_recipe(args, ctx: dict):
    """The bundled demo recipe as it is (its vision, bridge, stages and objectives) with the check's steps in every
    stage and the check's world; --smoke: on the tiny models, 4 samples a step."""
    sets = [
        f"device={args.device}",
        "log_every=1",
        "save_every=3",
        "keep_checkpoints=10",
        *(f"world.{k}={v}" for k, v in ctx["world"].items()),
        *(f"stages.{i}.steps={args.steps}" for i in range(len(load_recipe("demo").stages))),
    ]
    if ctx["tiny"]:
        sets += [*tiny_sets(ctx["tiny"], {}), *toy_stages("demo")]
    return load_recipe("demo", sets)


def adapter_recipe(args, ctx: dict):
    """A LLaVA-style run of the check's own, whatever the demo becomes: EfficientNet-Lite0 + pool-adapter (InfMLLM)
    + SmolLM2; (1) captions, bridge only; (2) captions, VQA and grounding, bridge + LoRA on the LM."""
    tiny = ctx["tiny"]
    vision = {"name": "hf", "path": tiny["clip"]} if tiny else {"name": "efficientnet_lite0", "image_size": 256}
    lm = {"path": tiny["lm"]} if tiny else dict(SMOLLM)
    batch = 4 if tiny else 16
    data = {
        "name": "gpu-check-adapter",
        "seed": 0,
        "device": args.device,
        "world": ctx["world"],
        "log_every": 1,
        "save_every": 0,
        "threads": 1 if tiny else 2,
        "model": {
            "vision": vision,
            "bridge": {"name": "pool_adapter", "pooled": 2 if tiny else 4},
            "lm": lm,
            "max_length": 256,
            "system_prompt": "",
        },
        "stages": [
            {
                "name": "align",
                "data": {"world/train/caption": 1.0},
                "train": {"vision": "frozen", "bridge": "full", "lm": "frozen"},
                "lr": {"bridge": 1e-2 if tiny else 2e-3},
                "steps": args.steps,
                "batch_size": batch,
                "warmup": 0.0,
            },
            {
                "name": "multitask",
                "data": {"world/train/caption": 1.0, "world/train/vqa": 1.0, "world/train/grounding": 1.0},
                "train": {"vision": "frozen", "bridge": "full", "lm": "lora"},
                "lr": {"bridge": 1e-3, "lm": 1e-3},
                "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                "steps": args.steps,
                "batch_size": batch,
                "warmup": 0.0,
            },
        ],
    }
    return recipe_from_dict(data)


def trained(args, recipe, run: Path) -> tuple[Trainer, list[dict], dict]:
    """Train `recipe` into `run` on the device; the trainer, its metrics rows and what `watched` saw."""
    trainer = Trainer(recipe, run, progress=False)
    seen = watched(trainer)
    trainer.run()
    return trainer, rows(run), seen


def on_device(args, trainer: Trainer, seen: dict, recipe) -> tuple[bool, dict]:
    """The model and every batch on the device; on a GPU, bf16 autocast."""
    device = resolve_device(args.device)
    out = {
        "model_device": str(trainer.model.device),
        "batch_devices": sorted(seen["devices"]),
        "autocast": str(autocast_dtype(recipe.model.precision, device)),
    }
    ok = trainer.model.device.type == device.type and seen["devices"] == {str(trainer.model.device)}
    return ok and (device.type != "cuda" or out["autocast"] == "torch.bfloat16"), out


def falls(losses: list[float]) -> bool:
    return statistics.mean(losses[-3:]) < statistics.mean(losses[:3])


# -- the checks ----------------------------------------------------------------------------------------------
def check_demo(args, ctx: dict) -> dict:
    recipe = demo_recipe(args, ctx)
    run = ctx["tmp"] / "demo"
    t0 = time.perf_counter()
    trainer, got, seen = trained(args, recipe, run)
    ok, out = on_device(args, trainer, seen, recipe)
    losses = {s.name: [r["loss"] for r in got if r["stage"] == s.name] for s in recipe.stages}
    ok = (
        ok
        and all(len(v) == s.steps for v, s in zip(losses.values(), recipe.stages))
        and all(math.isfinite(x) for v in losses.values() for x in v)
    )
    ctx["demo_run"], ctx["demo_rows"] = run, got
    return {
        "ok": ok,
        **out,
        "bridge": recipe.model.bridge["name"],
        "losses": losses,
        "step_s_median": statistics.median(r["step_s"] for r in got),
        "seconds": round(time.perf_counter() - t0, 1),
        "mfu_median": statistics.median(r["mfu"] for r in got) if got[0]["mfu"] is not None else None,
    }


def check_adapter(args, ctx: dict) -> dict:
    recipe = adapter_recipe(args, ctx)
    t0 = time.perf_counter()
    trainer, got, seen = trained(args, recipe, ctx["tmp"] / "adapter")
    ok, out = on_device(args, trainer, seen, recipe)
    align = [r["loss"] for r in got if r["stage"] == "align"]
    return {
        "ok": ok and falls(align),
        **out,
        "align_losses": align,
        "multitask_losses": [r["loss"] for r in got if r["stage"] == "multitask"],
        "step_s_median": statistics.median(r["step_s"] for r in got),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def check_resume(args, ctx: dict) -> dict:
    if "demo_rows" not in ctx:
        return {"ok": None, "skipped": "compares with the demo check's run: demo failed or was not in --checks"}
    recipe = demo_recipe(args, ctx)
    run = ctx["tmp"] / "resume"
    trainer = Trainer(recipe, run, progress=False)
    # at the last stage's step 5, after its checkpoint at step 3
    watched(trainer, stop_at_call=args.steps * (len(recipe.stages) - 1) + 5)
    try:
        trainer.run()
    except Interrupt:
        pass
    Trainer(recipe, run, resume=True, progress=False).run()
    got = {(r["stage"], r["step"]): r["loss"] for r in rows(run)}
    want = {(r["stage"], r["step"]): r["loss"] for r in ctx["demo_rows"]}
    rel = max(abs(got[k] - want[k]) / max(abs(want[k]), 1e-12) for k in want) if got.keys() == want.keys() else None
    tol = 1e-3 if resolve_device(args.device).type == "cuda" else 1e-6
    return {"ok": rel is not None and rel <= tol, "max_rel_diff": rel, "tolerance": tol, "steps": len(want)}


def check_eval(args, ctx: dict) -> dict:
    from mmbridge.cli import main
    from mmbridge.data.llava import read_llava_json
    from mmbridge.data.sources import resolve_source
    from mmbridge.eval.evaluate import evaluate_records
    from mmbridge.runs import load_run

    if "demo_run" not in ctx:
        return {"ok": None, "skipped": "evaluates the demo check's run: demo failed or was not in --checks"}
    run = ctx["demo_run"]
    model, processor = load_run(run, device=args.device)
    recipe = load_recipe(run / "recipe.yaml")
    src = resolve_source(recipe, "world/test/vqa")
    records = read_llava_json(src.json)[0][:16]
    t0 = time.perf_counter()
    metrics, preds = evaluate_records(model, processor, records, src.images, "vqa", max_new_tokens=8, progress=False)
    t_gen = time.perf_counter() - t0
    out_json = ctx["tmp"] / "eval.json"
    main(
        [
            "eval",
            str(run),
            "--data",
            src.json,
            "--images",
            src.images,
            "--task",
            "vqa",
            "--limit",
            "8",
            "--device",
            args.device,
            "--out",
            str(out_json),
        ]
    )
    cli = json.loads(out_json.read_text())
    return {
        "ok": model.device.type == resolve_device(args.device).type
        and len(preds) == len(records)
        and cli["n"] == min(8, len(records)),
        "model_device": str(model.device),
        "records": len(records),
        "vqa_accuracy": metrics["vqa_accuracy"],
        "generate_s": round(t_gen, 2),
        "cli_n": cli["n"],
        "example": preds[0]["prediction"],
    }


def check_lcl(args, ctx: dict) -> dict:
    sets = [
        f"device={args.device}",
        "log_every=1",
        "save_every=0",
        f"stages.0.steps={2 * args.steps}",
        *(f"world.{k}={v}" for k, v in ctx["world"].items()),
    ]
    if ctx["tiny"]:
        sets += [
            "model.vision={image_size: 32, patch_size: 8, width: 32, depth: 1, heads: 2}",
            "model.lm={tokenizer: words, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
            "num_key_value_heads: 1, intermediate_size: 64}",
            "model.max_length=128",
            "stages.0.batch_size=4",
            "threads=1",
        ]
    run = ctx["tmp"] / "lcl"
    trainer = Trainer(load_recipe("lcl", sets), run, progress=False)
    seen = watched(trainer)
    trainer.run()
    got = rows(run)
    losses = [r["loss"] for r in got]
    device = str(trainer.model.device)
    ok = seen["devices"] == {device} and falls(losses) and (run / "encoder" / "model.safetensors").is_file()
    return {
        "ok": ok,
        "model_device": device,
        "losses": losses,
        "step_s_median": statistics.median(r["step_s"] for r in got),
    }


def check_mfu(args, ctx: dict) -> dict:
    """~1.3B Llama (2048 wide, 16 layers, GQA 16/8 heads, SmolLM2's 49k vocabulary) + ViT-B/16 (224 px, 196
    tokens per image, frozen) + MLP bridge; packed rows of 2048 tokens; bridge and LM train in full."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    folder = ctx["tmp"] / "mfu-models"
    tok = smollm_tokenizer()
    if ctx["tiny"]:
        lm_cfg = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
        vit = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
        length, rows_per_step = 256, 2
    else:
        lm_cfg = dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=8,
        )
        vit = dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=16,
        )
        length, rows_per_step = 2048, args.mfu_rows
    device = resolve_device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        lm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                max_position_embeddings=4096,
                **lm_cfg,
                tie_word_embeddings=False,
                pad_token_id=tok.pad_token_id,
            )
        )
    n_params = sum(p.numel() for p in lm.parameters())
    lm.to(torch.bfloat16).save_pretrained(folder / "lm")  # bf16 on disk; loaded as fp32 master weights
    del lm
    tok.save_pretrained(folder / "lm")
    CLIPVisionModel(CLIPVisionConfig(**vit)).save_pretrained(folder / "vit")
    data = {
        "name": "gpu-check-mfu",
        "device": args.device,
        "world": ctx["world"],
        "log_every": 1,
        "num_workers": 0 if ctx["tiny"] else 6,
        "threads": 1 if ctx["tiny"] else None,
        "model": {
            "vision": {"name": "hf", "path": str(folder / "vit"), "feature_layer": -2},
            "bridge": {"name": "mlp"},
            "lm": {"path": str(folder / "lm")},
            "max_length": length,
            "system_prompt": "",
        },
        "stages": [
            {
                "name": "packed",
                "data": {"world/train/caption": 1.0, "world/train/vqa": 1.0},
                "train": {"vision": "frozen", "bridge": "full", "lm": "full"},
                "lr": {"bridge": 1e-4, "lm": 1e-5},
                "steps": args.mfu_steps,
                "batch_size": rows_per_step,
                "pack": True,
                "warmup": 0.0,
            }
        ],
    }
    recipe = recipe_from_dict(data)
    run = ctx["tmp"] / "mfu"
    trainer = Trainer(recipe, run, progress=False)
    t0 = time.perf_counter()
    trainer.run()
    got = rows(run)[args.mfu_warmup :]  # the first steps compile flex_attention's kernels
    mfu = [r["mfu"] for r in got if r["mfu"] is not None]
    return {
        "ok": all(r["loss"] > 0 for r in got),
        "lm_params": n_params,
        "rows_per_step": rows_per_step,
        "seq_len": length,
        "tokens_per_step": statistics.median(r["tokens"] for r in got),
        "step_s_median": statistics.median(r["step_s"] for r in got),
        "tok_per_s_median": statistics.median(r["tok_per_s"] for r in got),
        "mfu_median": statistics.median(mfu) if mfu else None,
        "target": 0.45,
        "peak": trainer.peak,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def check_pytest_gpu(args, ctx: dict) -> dict:
    if resolve_device(args.device).type != "cuda":
        return {"ok": None, "skipped": "no GPU"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_device.py", "-k", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return {"ok": proc.returncode == 0, "tail": proc.stdout[-600:]}


CHECKS = {
    "demo": check_demo,
    "adapter": check_adapter,
    "resume": check_resume,
    "eval": check_eval,
    "lcl": check_lcl,
    "mfu": check_mfu,
    "pytest_gpu": check_pytest_gpu,
}


def passed(result: dict) -> bool:
    """A check passed, or was skipped with a reason (no GPU; the run it needs is missing)."""
    return result["ok"] is True or (result["ok"] is None and "skipped" in result)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default cuda (--smoke: auto, the GPU if there is one)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (a CPU dry run of every check)")
    parser.add_argument("--checks", default=",".join(CHECKS))
    parser.add_argument("--steps", type=int, default=8, help="steps per stage of the demo and adapter runs")
    parser.add_argument("--mfu-steps", type=int, default=None, help="default 12 (--smoke: 3)")
    parser.add_argument("--mfu-warmup", type=int, default=None, help="steps left out; default 4 (--smoke: 1)")
    parser.add_argument("--mfu-rows", type=int, default=8, help="packed rows of 2048 tokens per step")
    args = parser.parse_args()
    args.device = args.device or ("auto" if args.smoke else "cuda")
    unknown = set(args.checks.split(",")) - set(CHECKS)
    if unknown:
        parser.error(f"unknown check(s) {sorted(unknown)}; choose from {list(CHECKS)}")
    if args.steps < 6:
        parser.error(
            "--steps: at least 6 (the resume check stops at the last stage's step 5, after its checkpoint at 3)"
        )
    args.mfu_steps = args.mfu_steps or (3 if args.smoke else 12)
    args.mfu_warmup = (1 if args.smoke else 4) if args.mfu_warmup is None else args.mfu_warmup
    device = resolve_device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"gpu_check on {device} ({gpu or 'no GPU'}), torch {torch.__version__}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        world = (
            tiny_world(tmp)
            if args.smoke
            else {
                "root": str(ROOT / ".cache" / "gpu-check-world"),
                "n_train": 400,
                "n_val": 40,
                "n_test": 40,
                "seed": 0,
                "image_size": 256,
            }
        )
        # one world for every check: the demo's conversations (vqa_turns), so that no check rewrites it
        ctx = {
            "tmp": Path(tmp),
            "tiny": tiny_models(tmp) if args.smoke else None,
            "world": {**world, "vqa_turns": "type"},
        }
        for name in args.checks.split(","):
            t0 = time.perf_counter()
            try:
                results[name] = CHECKS[name](args, ctx)
            except Exception as e:  # a failed check is reported, and the others still run
                results[name] = {
                    "ok": False,
                    "error": f"{type(e).__name__}: {e}",
                    "trace": traceback.format_exc()[-1500:],
                }
            results[name]["seconds_total"] = round(time.perf_counter() - t0, 1)
            print(f"{name}: {json.dumps(results[name], default=str)[:800]}", flush=True)
    summary = {
        "benchmark": "gpu_check",
        "device": str(device),
        "gpu": gpu,
        "torch": torch.__version__,
        "smoke": args.smoke,
        "all_ok": all(passed(r) for r in results.values()),
        "checks": results,
    }
    print(json.dumps(summary, default=str))
    return summary


if __name__ == "__main__":
    main()
