"""Sequence packing: several samples per row, so that a micro-batch carries (almost) no padding.

`PackedBatches` draws the stage's mixture stream a window at a time and packs it best-fit
decreasing into rows of at most `budget` tokens (and `max_images` images); every micro-batch is
`rows` rows. Samples are never cut, so an image's tokens never fall apart. `PackingCollator`
lays each row out with per-sample position ids and segment ids (1, 2, … per row, 0 for padding),
from which the model builds a block-diagonal attention mask: no position sees another sample.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbridge.data.dataset import Collator, MixtureSampler
from mmbridge.data.processor import IGNORE


def pack(lengths, images, budget: int, max_images: int = 0) -> list[list[int]]:
    """Best-fit decreasing: sample positions → rows of at most `budget` tokens and, if `max_images`,
    at most that many images. Each sample goes to the fullest row it fits in (ties: the oldest row)."""
    lengths, images = np.asarray(lengths, dtype=np.int64), np.asarray(images, dtype=np.int64)
    if len(lengths) and lengths.max() > budget:
        raise ValueError(f"a sample of {int(lengths.max())} tokens exceeds the packing budget of {budget}")
    if max_images and len(images) and images.max() > max_images:
        raise ValueError(f"a sample with {int(images.max())} images exceeds the budget of {max_images} per row")
    rows: list[list[int]] = []
    used_images: list[int] = []
    free: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for i in np.argsort(-lengths, kind="stable").tolist():
        n, k = int(lengths[i]), int(images[i])
        at = bisect.bisect_left(free, (n, -1))
        while at < len(free) and max_images and used_images[free[at][1]] + k > max_images:
            at += 1
        if at < len(free):
            left, r = free.pop(at)
            rows[r].append(i)
            used_images[r] += k
            bisect.insort(free, (left - n, r))
        else:
            rows.append([i])
            used_images.append(k)
            bisect.insort(free, (budget - n, len(rows) - 1))
    return rows


class PackedBatches(torch.utils.data.Sampler):
    """Micro-batches of `rows` packed rows, as lists of (dataset index, row) pairs.

    Each window takes samples from the mixture stream until it holds `window` micro-batches'
    worth of tokens, packs them, groups rows of similar fill and shuffles the micro-batch order
    (seeded). Windows depend only on the stream, so resuming at micro-batch `start` replays the
    (cheap, index-only) packing up to there and continues exactly as an uninterrupted run.
    """

    def __init__(
        self,
        lengths,
        images,
        sampler_args: dict,
        rows: int,
        budget: int,
        max_images: int = 0,
        window: int = 16,
        start: int = 0,
    ):
        self.lengths, self.images = np.asarray(lengths, dtype=np.int64), np.asarray(images, dtype=np.int64)
        self.sampler_args, self.rows, self.budget = sampler_args, rows, budget
        self.max_images, self.window, self.start = max_images, window, start

    def windows(self):
        """Each window's micro-batches, each a list of rows of dataset indices."""
        stream = iter(MixtureSampler(**self.sampler_args))
        target = self.window * self.rows * self.budget
        w = 0
        while True:
            idx, tokens = [], 0
            while tokens < target:
                i = next(stream)
                idx.append(i)
                tokens += int(self.lengths[i])
            idx = np.asarray(idx)
            rows = [idx[r].tolist() for r in pack(self.lengths[idx], self.images[idx], self.budget, self.max_images)]
            rows.sort(key=lambda r: int(self.lengths[r].sum()))  # stable: rows of similar fill share a batch
            batches = [rows[j : j + self.rows] for j in range(0, len(rows), self.rows)]
            order = np.random.default_rng([self.sampler_args["seed"], 7920, w]).permutation(len(batches))
            yield [batches[b] for b in order]
            w += 1

    def __iter__(self):
        skip = self.start
        for batches in self.windows():
            if skip >= len(batches):
                skip -= len(batches)
                continue
            for batch in batches[skip:]:
                yield [(i, r) for r, row in enumerate(batch) for i in row]
            skip = 0

    def __len__(self) -> int:  # endless; the trainer stops by step count
        return 2**62


def rows_per_epoch(lengths, budget: int) -> int:
    """Rows one pass over the data fills when packed (what `epochs` counts in micro-batch rows)."""
    return max(1, math.ceil(int(np.sum(lengths)) / budget))


class RowTagged(Dataset):
    """`dataset[(index, row)]` is `dataset[index]` marked with the packed row it goes to."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        index, row = key
        return {**self.dataset[index], "row": row}


class PackingCollator(Collator):
    """Lays out packed rows: input ids, labels (each sample's first label ignored, so no sample
    predicts the next one's first token), `position_ids` restarting at 0 per sample, `segment_ids`
    and an `attention_mask` of real tokens. Images, ids and bridge text follow the row-major
    sample order, which is the order of the image tokens. `width`: pad every row to this many tokens
    (a fixed shape, so compiled attention kernels on a GPU are built once); default: the longest row."""

    def __init__(self, processor, width: int | None = None):
        super().__init__(processor)
        self.width = width

    def __call__(self, items: list[dict]) -> dict:
        skipped = Counter(it["skip"] for it in items if "skip" in it)
        items = [it for it in items if "skip" not in it]
        if not items:
            return {"skipped": skipped, "empty": True}
        by_row: dict[int, list[dict]] = {}
        for it in items:
            by_row.setdefault(it["row"], []).append(it)
        rows = list(by_row.values())
        width = max(max(sum(len(it["input_ids"]) for it in row) for row in rows), self.width or 0)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.processor.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        segment_ids = torch.zeros(shape, dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for s, it in enumerate(row):
                n = len(it["input_ids"])
                input_ids[r, at : at + n] = torch.as_tensor(it["input_ids"])
                labels[r, at + 1 : at + n] = torch.as_tensor(it["labels"][1:])
                position_ids[r, at : at + n] = torch.arange(n)
                segment_ids[r, at : at + n] = s + 1
                at += n
        ordered = [it for row in rows for it in row]
        return {
            "ids": [it["id"] for it in ordered],
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": (segment_ids > 0).long(),
            "position_ids": position_ids,
            "segment_ids": segment_ids,
            "pixel_values": self._pixels(ordered),
            "skipped": skipped,
            **self._bridge_text(ordered),
            **self._frame_counts(ordered),
            **self._visual_index(ordered),
        }
