"""Does the model look at the image? Its answer loss with each record's own image vs a wrong one.

A model that answers from the question alone (a language prior) scores the same either way; one
that reads the image pays for the wrong picture. A record's wrong image is the next different
image file among the records (cyclically), so both passes see the same images, paired otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmbridge.data.dataset import Collator
from mmbridge.data.images import load_image, preprocess
from mmbridge.data.llava import record_images
from mmbridge.data.media import media_path
from mmbridge.train.distributed import to_device


@torch.no_grad()
def image_reliance(model, processor, records: list[dict], image_root: str | Path, batch_size: int = 16) -> dict:
    """Mean loss per answer token with the right images and with shifted ones, and their gap.

    Returns ``{"answer_loss", "answer_loss_wrong_image", "image_gain", "n"}``; `image_gain` near 0 means
    the answers do not depend on the image. Every record needs exactly one image.
    """
    paths = []
    for r in records:
        imgs = record_images(r)
        if len(imgs) != 1:
            raise ValueError(f"record {r.get('id')}: image_reliance needs exactly one image, got {len(imgs)}")
        paths.append(media_path(image_root, imgs[0]))
    distinct = list(dict.fromkeys(paths))
    if len(distinct) < 2:
        raise ValueError("image_reliance needs records with at least two different images")
    following = {p: distinct[(k + 1) % len(distinct)] for k, p in enumerate(distinct)}
    shifted = [following[p] for p in paths]
    collate = Collator(processor)
    device = model.device
    model.eval()
    totals = {"own": 0.0, "wrong": 0.0}
    n_tokens = 0
    for i in range(0, len(records), batch_size):
        chunk = range(i, min(i + batch_size, len(records)))
        items = []
        for j in chunk:
            enc = processor.encode(records[j]["conversations"], 1, f"record {records[j].get('id')}")
            items.append(
                {
                    "id": str(records[j].get("id")),
                    "input_ids": enc.input_ids,
                    "labels": enc.labels,
                    "pixel_values": torch.zeros(0),
                }
            )
        batch = to_device(collate(items), device)
        for key, source in (("own", paths), ("wrong", shifted)):
            if processor.tiling.varies:  # each image its own count: the sequences follow the images
                out = _tiled_loss(model, processor, collate, records, chunk, source, device)
                totals[key] += float(out.loss)
                continue
            pixels = preprocess(
                [load_image(source[j]) for j in chunk], processor.image_size, processor.image_mean, processor.image_std
            ).to(device)
            with model.autocast():
                out = model(batch["input_ids"], batch["attention_mask"], pixels, batch["labels"], normalizer=1.0)
            totals[key] += float(out.loss)
        n_tokens += float(out.num_targets)
    own, wrong = totals["own"] / max(n_tokens, 1), totals["wrong"] / max(n_tokens, 1)
    return {"answer_loss": own, "answer_loss_wrong_image": wrong, "image_gain": wrong - own, "n": len(records)}


def _tiled_loss(model, processor, collate, records, chunk, source, device):
    """The summed answer loss of `chunk`'s records, each with the image at `source[j]` and that image's own
    token count (a varying tiling)."""
    items = []
    for j in chunk:
        views = processor.images([load_image(source[j])])
        enc = processor.encode(records[j]["conversations"], 1, f"record {records[j].get('id')}", views["counts"])
        items.append(
            {
                "id": str(j),
                "input_ids": enc.input_ids,
                "labels": enc.labels,
                "image_counts": views["visual_counts"],
                **{k: views[k] for k in views if k not in ("counts", "visual_counts")},
            }
        )
    batch = to_device(collate(items), device)
    with model.autocast():
        return model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["labels"],
            normalizer=1.0,
            visual_index=batch["visual_index"],
            view_sizes=batch.get("view_sizes"),
        )
