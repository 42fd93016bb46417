"""LCL's interleaved sequences: text tokens, and for each image `<soi>` + its patch tokens + `<eoi>`.

Documents (MMC4 style): images below `min_sim` are dropped, at most one image per sentence (the best
matched), at most `max_images`, each placed before or after its matched sentence with p = 0.5. An
image-text pair is a one-sentence document, so it comes image-first or text-first with p = 0.5.
Truncation to `max_length` may cut text but never an image: an image that does not fit whole is
dropped together with everything after it. Targets are text tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mmbridge.core import RecipeError
from mmbridge.data.images import load_image
from mmbridge.registry import SETTINGS

IGNORE = -100
SOI, EOI, PATCH = "<soi>", "<eoi>", "<patch>"


@dataclass
class ImageRef:
    """One image of a document: a file path or a decoded PIL image, and its matched sentence."""

    source: object
    text_index: int
    sim: float = 1.0


@dataclass
class Document:
    texts: list[str]
    images: list[ImageRef] = field(default_factory=list)
    id: str = ""


@dataclass
class SequenceConfig:
    max_length: int = 384
    max_images: int = 6
    min_sim: float = 0.2
    image_position: str = "random"  # random (p = 0.5 before/after) | before | after its sentence
    patches: bool = True  # False: an image is only `<soi>` (contrastive-only runs need no patch tokens)

    def __post_init__(self):
        if self.image_position not in ("random", "before", "after"):
            raise ValueError(f"image_position must be random, before or after, got {self.image_position!r}")


@dataclass
class SpecialIds:
    soi: int
    eoi: int
    patch: int
    pad: int

    @classmethod
    def of(cls, tokenizer) -> SpecialIds:
        return cls(*tokenizer.convert_tokens_to_ids([SOI, EOI, PATCH]), tokenizer.pad_token_id)


def select_images(doc: Document, cfg: SequenceConfig) -> dict[int, ImageRef]:
    """sentence index → its image: similar enough, the best match per sentence, the best `max_images`."""
    best: dict[int, ImageRef] = {}
    for im in doc.images:
        if im.sim < cfg.min_sim or not 0 <= im.text_index < len(doc.texts):
            continue
        if im.text_index not in best or im.sim > best[im.text_index].sim:
            best[im.text_index] = im
    keep = sorted(best.items(), key=lambda kv: -kv[1].sim)[: cfg.max_images]
    return dict(sorted(keep))


def layout(doc: Document, cfg: SequenceConfig, rng: np.random.Generator) -> list[tuple[str, object]]:
    """The document as ("text", sentence) and ("image", ImageRef) pieces in reading order."""
    chosen = select_images(doc, cfg)
    pieces: list[tuple[str, object]] = []
    for i, text in enumerate(doc.texts):
        im = chosen.get(i)
        if im is None:
            pieces.append(("text", text))
            continue
        before = cfg.image_position == "before" or (cfg.image_position == "random" and rng.random() < 0.5)
        pair = [("image", im), ("text", text)]
        pieces += pair if before else pair[::-1]
    return pieces


def build_sequence(
    doc: Document,
    cfg: SequenceConfig,
    ids: SpecialIds,
    n_patches: int,
    encode: Callable[[str], list[int]],
    rng: np.random.Generator,
) -> dict:
    """input_ids, labels (text tokens only) and the images in order of their `<soi>`."""
    span = [ids.soi] + ([ids.patch] * n_patches + [ids.eoi] if cfg.patches else [])
    input_ids: list[int] = []
    labels: list[int] = []
    images: list[object] = []
    for kind, item in layout(doc, cfg, rng):
        room = cfg.max_length - len(input_ids)
        if kind == "image":
            if len(span) > room:
                break  # never cut an image apart
            input_ids += span
            labels += [IGNORE] * len(span)
            images.append(item.source)
        else:
            toks = encode(item if not input_ids else " " + item)[:room]
            input_ids += toks
            labels += toks
            if len(toks) == room:
                break
    return {"input_ids": input_ids, "labels": labels, "images": images, "id": doc.id}


class ImageCache:
    """Decoded, resized uint8 images kept in memory (small images, many epochs)."""

    def __init__(self, size: int, mean, std):
        self.size, self.cache = size, {}
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def _array(self, source) -> np.ndarray:
        key = source if isinstance(source, str) else None
        if key is not None and key in self.cache:
            return self.cache[key]
        img = load_image(source) if isinstance(source, str) else source.convert("RGB")
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), resample=3)  # bicubic
        arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
        if key is not None:
            self.cache[key] = arr
        return arr

    def __call__(self, sources: list) -> torch.Tensor:
        if not sources:
            return torch.empty(0, 3, self.size, self.size)
        x = torch.from_numpy(np.stack([self._array(s) for s in sources])).float() / 255.0
        return (x - self.mean) / self.std


def collate(samples: list[dict], pad_id: int, images: ImageCache) -> dict:
    """Right-padded batch; `pixel_values` hold every image of the batch in row-major `<soi>` order."""
    length = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    pixels = images([im for s in samples for im in s["images"]])
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": pixels,
        "ids": [s["id"] for s in samples],
    }


@SETTINGS.register("sequence.lcl")
def check_lcl_settings(options: dict, where: str) -> None:
    """Kind lcl's `sequence` (with the model's max_length): a valid `SequenceConfig`."""
    try:
        SequenceConfig(**options)
    except TypeError as e:
        raise RecipeError(f"{where}: {e}; expected keys max_images, min_sim, image_position, patches") from e
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from e
