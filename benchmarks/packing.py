"""How much of a micro-batch is real tokens: padded vs length-grouped vs packed, on the demo's data mix.

Reads the bundled demo recipe's stage 2 (captions + VQA + grounding from the shapes world,
tokenised with SmolLM2's chat template, 16 visual tokens per image, max_length 256) and draws
`--batches` micro-batches from the same seeded mixture three ways: padded (the demo without
`group_by_length`), length-grouped (the demo as shipped), and packed (`pack: true`, rows of
max_length tokens). Tokenisation only; no model runs. The last line is one JSON object.

    python benchmarks/packing.py            # ~1 min (tokenising 9,000 samples)
    python benchmarks/packing.py --smoke    # seconds: a small world in a temporary folder, 20 micro-batches
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from torch.utils.data import BatchSampler

from mmbridge.config import load_recipe
from mmbridge.data.dataset import ConversationDataset, LengthGroupedBatches, MixtureSampler
from mmbridge.data.packing import PackedBatches
from mmbridge.data.processor import Processor
from mmbridge.data.sources import resolve_source
from mmbridge.models.bridges import build_bridge
from mmbridge.models.language import IMAGE_TOKEN, _dequantised_gguf, resolve_path
from mmbridge.models.vision import build_vision_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tiny_world  # noqa: E402

SMOKE_KEYS = ("benchmark", "samples", "padded", "length_grouped", "packed", "settings")  # the last JSON line's keys


def demo_processor(recipe) -> Processor:
    """The demo's processor without loading the LM: tokenizer, and visual tokens per image from the bridge."""
    from transformers import AutoTokenizer

    lm = recipe.model.lm
    tok = AutoTokenizer.from_pretrained(_dequantised_gguf(resolve_path(lm["path"]), lm["gguf_file"], None))
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    vision = build_vision_encoder({**recipe.model.vision, "pretrained": False})
    bridge = build_bridge(dict(recipe.model.bridge), vision.hidden_size, 8, vision.grid, in_tokens=vision.num_tokens)
    return Processor(
        tok,
        bridge.num_tokens,
        vision.image_size,
        vision.image_mean,
        vision.image_std,
        max_length=recipe.model.max_length,
        system_prompt=recipe.model.system_prompt,
    )


def fill(batches, lengths) -> dict:
    """Real tokens / tokens computed (rows x width of each micro-batch)."""
    real = computed = samples = 0
    for b in batches:
        rows: dict = {}
        for key in b:
            i, r = key if isinstance(key, tuple) else (key, len(rows))
            rows.setdefault(r, []).append(i)
        widths = [int(lengths[v].sum()) for v in rows.values()]
        real += sum(widths)
        computed += len(widths) * max(widths)
        samples += sum(len(v) for v in rows.values())
    return {
        "real_token_fraction": round(real / computed, 4),
        "samples_per_batch": round(samples / len(batches), 2),
        "tokens_per_batch": round(computed / len(batches), 1),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--rows", type=int, default=4, help="packed rows per micro-batch")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: a small world, 20 micro-batches")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sets = []
        if args.smoke:
            sets, args.batches = [f"world.{k}={v}" for k, v in tiny_world(tmp).items()], 20
        return measure(args, load_recipe("demo", sets))


def measure(args, recipe) -> dict:
    stage = recipe.stages[1]
    proc = demo_processor(recipe)
    parts = []
    for name in stage.data:
        src = resolve_source(recipe, name)
        parts.append(ConversationDataset(src.json, src.images, proc))
    lengths = np.concatenate([p.lengths for p in parts])
    images = np.concatenate([p.n_images for p in parts])
    mix = {"sizes": [len(p) for p in parts], "weights": list(stage.data.values()), "seed": stage.seed}
    budget = recipe.model.max_length
    n = args.batches
    result = {
        "benchmark": "packing",
        "smoke": args.smoke,
        "data": list(stage.data),
        "samples": int(len(lengths)),
        "mean_length": round(float(lengths.mean()), 1),
        "max_length": budget,
        "padded": fill(list(islice(BatchSampler(MixtureSampler(**mix), stage.batch_size, True), n)), lengths),
        "length_grouped": fill(
            list(
                islice(
                    iter(LengthGroupedBatches(lengths, mix, stage.batch_size, window=stage.group_by_length or 16)), n
                )
            ),
            lengths,
        ),
        "packed": fill(list(islice(iter(PackedBatches(lengths, images, mix, args.rows, budget)), n)), lengths),
        "settings": {
            "batch_size": stage.batch_size,
            "group_by_length": stage.group_by_length or 16,
            "packed_rows": args.rows,
            "micro_batches": n,
        },
    }
    for k in ("padded", "length_grouped", "packed"):
        print(
            f"{k:>15}: {100 * result[k]['real_token_fraction']:5.1f} % real tokens, "
            f"{result[k]['samples_per_batch']} samples / micro-batch"
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
