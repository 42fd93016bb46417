"""A small analogue of the LCL paper's Table 1: how good is a ViT pretrained from scratch by each objective?

Three objectives train the same ViT and LM from the same random init (`recipes/lcl.yaml`, seed 0) for
the same steps on the built-in world: LCL (L_gen + 0.1·L_con on interleaved documents), contrastive
only (CLIP-style: InfoNCE on image-text pairs, text first; 3x the batch so each step sees about as
many images as a document batch) and generation only (Flamingo-style: L_gen on the documents).
Frozen features are then scored on held-out data: a linear probe on the world's attributes (shape and
colour of the largest object, object count; train split → test split), and image-text retrieval R@1
on test images and their sentences (mean of both directions), by contrastive embeddings, and by the
LM's likelihood of the text after the image for the objectives that train generation. The untrained
init is the floor. The paper's ordering: LCL ≥ contrastive ≫ generation only. Last line: one JSON object.

    python benchmarks/lcl_table1.py                         # full run (~15 min alone on the 2-core CPU)
    python benchmarks/lcl_table1.py --steps 20 --probe-train 200 --probe-test 100 --retrieval-n 30   # a small run
    python benchmarks/lcl_table1.py --smoke    # seconds: a tiny ViT and LM, a small world, 2 steps per method
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmbridge.config import load_recipe
from mmbridge.data.shapes_world import COLOURS, SHAPES, scene_sentence, split_scenes
from mmbridge.lcl.sequence import ImageCache
from mmbridge.objectives import build_objective
from mmbridge.train.tasks import spec_for
from mmbridge.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tiny_world  # noqa: E402

SMOKE_KEYS = ("benchmark", "chance", "rows")  # what the last JSON line holds (the smoke test reads this)
# --smoke: the LCL recipe's ViT and LM at toy size
TINY = [
    "model.vision={image_size: 32, patch_size: 8, width: 32, depth: 1, heads: 2}",
    "model.lm={tokenizer: words, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
    "num_key_value_heads: 1, intermediate_size: 64}",
    "model.max_length=128",
]
METHODS = {
    "lcl": [],
    "contrastive": [
        "stages.0.data={world/train/pairs: 1.0}",
        "sequence.image_position=after",
        "sequence.patches=false",
        "stages.0.objective.gen_weight=0.0",
        "stages.0.objective.lambda_con=1.0",
    ],
    "generation": ["stages.0.objective.lambda_con=0.0"],
}


def recipe_for(method: str, args):
    sets = [
        f"stages.0.steps={args.steps}",
        f"stages.0.batch_size={args.batch}",
        f"threads={args.threads}",
        "save_every=0",
        "log_every=10",
        f"name=bench-{method}",
        *args.sets,
    ] + METHODS[method]
    if method == "contrastive":
        sets.append(f"stages.0.batch_size={args.batch * 3}")
    return load_recipe("lcl", sets)


def eval_data(recipe, args) -> dict:
    """Test/train images with attribute labels and the test sentences, from the world's own scenes."""
    from mmbridge.data.sources import world_manifest

    w = {**recipe.world}
    _, root = world_manifest(w)
    out = {}
    for split, n in (("train", args.probe_train), ("test", max(args.probe_test, args.retrieval_n))):
        scenes = split_scenes(w.get("seed", 0), split, n, w.get("image_size", 256))
        big = [max(s.objects, key=lambda o: o.box[2] - o.box[0]) for s in scenes]
        out[split] = {
            "paths": [str(root / split / f"{split}_{i:05d}.png") for i in range(n)],
            "shape": [SHAPES.index(o.shape) for o in big],
            "colour": [list(COLOURS).index(o.colour) for o in big],
            "count": [len(s.objects) - 1 for s in scenes],
            "text": [scene_sentence(s) for s in scenes],
        }
    return out


@torch.no_grad()
def features(model, paths: list[str]) -> dict:
    c = model.vit.config
    cache = ImageCache(c.image_size, c.image_mean, c.image_std)
    mean, latent, tokens = [], [], []
    for i in range(0, len(paths), 100):
        f = model.vit.patch_features(cache(paths[i : i + 100]))
        lat, tok = model.vit.pool(f)
        mean.append(f.mean(1)), latent.append(lat), tokens.append(tok)
    return {"mean": torch.cat(mean), "latent": torch.cat(latent), "tokens": torch.cat(tokens)}


def probe(xtr: torch.Tensor, ytr: list[int], xte: torch.Tensor, yte: list[int], l2: float = 1e-3) -> float:
    """Multinomial logistic regression on standardised frozen features (L-BFGS); test accuracy."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    ytr_t, classes = torch.tensor(ytr), max(ytr + yte) + 1
    w = torch.zeros(xtr.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr_t) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((xte @ w + b).argmax(1) == torch.tensor(yte)).float().mean())


def r_at_1(sim: torch.Tensor) -> float:
    """Mean of image→text and text→image R@1 for a square [images, texts] score matrix."""
    target = torch.arange(sim.shape[0])
    return float(((sim.argmax(1) == target).float().mean() + (sim.argmax(0) == target).float().mean()) / 2)


def encode_texts(tok, texts: list[str], suffix: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tok(t, add_special_tokens=False)["input_ids"] + suffix for t in texts]
    n = max(map(len, rows))
    ids = torch.full((len(rows), n), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


@torch.no_grad()
def retrieval(model, objective, tok, feats: dict, texts: list[str], likelihood: bool) -> dict:
    n = len(texts)
    ids, mask = encode_texts(tok, texts, [model.ids.soi])
    text = objective.text_features(model, ids, mask)
    out = {"r1_contrastive": round(r_at_1(F.normalize(feats["latent"][:n], dim=-1) @ text.T), 4)}
    if likelihood:  # log p(text | <soi> patches <eoi>) for every image-text pair
        ids, mask = encode_texts(tok, texts, [])
        table = model.lm.get_input_embeddings()
        text_emb = table(ids)
        ends = table(torch.tensor([model.ids.soi, model.ids.eoi]))
        scores = torch.empty(n, n)
        for i in range(n):
            span = torch.cat([ends[:1], feats["tokens"][i], ends[1:]])
            k = span.shape[0]
            embeds = torch.cat([span.expand(n, -1, -1), text_emb], 1)
            full = torch.cat([torch.ones(n, k, dtype=mask.dtype), mask], 1)
            h = model.lm.get_decoder()(inputs_embeds=embeds, attention_mask=full).last_hidden_state
            logp = model.lm.get_output_embeddings()(h[:, k - 1 : -1]).log_softmax(-1)
            scores[i] = (logp.gather(-1, ids[..., None])[..., 0] * mask).sum(1)
        out["r1_likelihood"] = round(r_at_1(scores), 4)
    return out


def score(model, objective, tok, data: dict, args, likelihood: bool) -> dict:
    model.eval()
    tr, te = features(model, data["train"]["paths"]), features(model, data["test"]["paths"])
    row = {}
    for kind in ("mean", "latent"):
        for attr in ("shape", "colour", "count"):
            n = args.probe_test
            acc = probe(tr[kind], data["train"][attr], te[kind][:n], data["test"][attr][:n])
            row[f"probe_{attr}" + ("" if kind == "mean" else "_latent")] = round(acc, 4)
    row["probe_mean"] = round(float(np.mean([row[f"probe_{a}"] for a in ("shape", "colour", "count")])), 4)
    return {**row, **retrieval(model, objective, tok, te, data["test"]["text"][: args.retrieval_n], likelihood)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16, help="documents per step (contrastive: 3x pairs)")
    parser.add_argument("--probe-train", type=int, default=1500)
    parser.add_argument("--probe-test", type=int, default=300)
    parser.add_argument("--retrieval-n", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-lcl")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="toy sizes: a tiny ViT and LM, a small world, 2 steps per method, a few probe images",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        args.sets = list(args.set)
        if args.smoke:
            args.sets = [*TINY, *(f"world.{k}={v}" for k, v in tiny_world(tmp).items()), *args.set]
            args.steps, args.batch, args.probe_train, args.probe_test, args.retrieval_n = 2, 4, 16, 8, 8
            args.threads, args.out = 1, str(Path(tmp) / "runs")
        return compare(args)


def compare(args) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base = recipe_for("lcl", args)
    data = eval_data(base, args)
    rows = {}
    for method in args.methods.split(","):
        recipe = recipe_for(method, args)
        run = Path(args.out) / method
        shutil.rmtree(run, ignore_errors=True)
        t1 = time.perf_counter()
        trainer = Trainer(recipe, run, progress=False)  # the one training engine, as `mmbridge train` runs it
        trainer.run()
        t_train = time.perf_counter() - t1
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        gen = recipe.stages[0].objective.get("gen_weight", 1.0) > 0
        rows[method] = {
            **score(trainer.model, trainer.objective, trainer.tokenizer, data, args, likelihood=gen),
            "train_s": round(t_train, 1),
            "final_loss_gen": last["loss_gen"],
            "final_loss_con": last["loss_con"],
        }
        print(f"{method}: {rows[method]}", flush=True)
    # the floor: the same init, untrained (LCL's tokenizer: the documents' full vocabulary)
    task = spec_for(base).task
    model, tok = task.build()
    torch.manual_seed(base.stages[0].seed)
    rows["random_init"] = score(
        model, build_objective(base.stages[0].objective, model), tok, data, args, likelihood=True
    )
    print(f"random_init: {rows['random_init']}", flush=True)
    print_table(rows)
    table = {
        "benchmark": "lcl_table1",
        "smoke": args.smoke,
        "steps": args.steps,
        "batch_docs": args.batch,
        "batch_pairs": args.batch * 3,
        "probe_train": args.probe_train,
        "probe_test": args.probe_test,
        "retrieval_n": args.retrieval_n,
        "chance": {"shape": 0.25, "colour": round(1 / 6, 4), "r1": round(1 / args.retrieval_n, 4)},
        "total_s": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    print(json.dumps(table))
    return table


def print_table(rows: dict) -> None:
    cols = ["probe_shape", "probe_colour", "probe_count", "probe_mean", "r1_contrastive", "r1_likelihood"]
    print(f"{'method':<13}" + "".join(f"{c:>16}" for c in cols))
    for name, row in rows.items():
        print(f"{name:<13}" + "".join(f"{row.get(c, '-'):>16}" for c in cols))


if __name__ == "__main__":
    main()
