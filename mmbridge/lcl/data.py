"""LCL's batches: documents → interleaved sequences, in a seeded, resumable order, sliced over processes.

Data names: `world/<split>/interleaved` (the built-in world's documents), `world/<split>/pairs` (each of
their images with its matched sentence), or a key of `sources`: `{jsonl, images}` for an MMC4-style
file or `{shards}` (a folder or glob of webdataset tars); `pairs: true` splits into pairs.

In-memory sources are concatenated and read in a seeded permutation per epoch: micro-batch k holds the
global positions [k·B, (k+1)·B) of that stream, and each document's random layout draws from an rng
seeded by (seed, epoch, index), so a resume, or any number of processes, sees the same sequences.
Shards stream: process r reads shards r, r + W, … in a seeded order per epoch, its own share of each
micro-batch at a time; a resume skips the documents already used.
"""

from __future__ import annotations

import glob
import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from mmbridge.config import Recipe, RecipeError
from mmbridge.lcl.readers import as_pairs, iter_shards, read_jsonl
from mmbridge.lcl.sequence import Document, ImageCache, SequenceConfig, SpecialIds, build_sequence, collate


def resolve_documents(recipe: Recipe, name: str) -> list[Document] | list[str]:
    """Documents of a data name (read into memory), or the shard paths of a `shards` source."""
    if name.startswith("world/") and name not in recipe.sources:
        from mmbridge.data.sources import world_manifest

        parts = name.split("/")
        manifest, images = world_manifest(recipe.world)
        if len(parts) != 3 or parts[1] not in manifest or parts[2] not in ("interleaved", "pairs"):
            raise RecipeError(f"data {name!r}: expected world/<{'|'.join(manifest)}>/<interleaved|pairs>")
        docs = read_jsonl(manifest[parts[1]]["interleaved"], images)
        return as_pairs(docs) if parts[2] == "pairs" else docs
    src = recipe.sources[name]
    if src.shards:
        pattern = str(src.shards)
        urls = sorted(glob.glob(str(Path(pattern) / "*.tar")) if Path(pattern).is_dir() else glob.glob(pattern))
        if not urls:
            raise RecipeError(f"sources.{name}.shards: no tar files match {pattern!r}")
        return urls
    docs = read_jsonl(src.jsonl, src.images)
    return as_pairs(docs) if src.pairs else docs


class Sequences(torch.utils.data.Dataset):
    """Item `epoch·n + i`: document i laid out with the rng of (seed, epoch, i)."""

    def __init__(
        self,
        docs: list[Document],
        cfg: SequenceConfig,
        ids: SpecialIds,
        n_patches: int,
        encode: Callable[[str], list[int]],
        seed: int,
    ):
        self.docs, self.cfg, self.ids, self.n_patches, self.encode, self.seed = docs, cfg, ids, n_patches, encode, seed

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, k: int) -> dict:
        epoch, i = divmod(int(k), len(self.docs))
        return build_sequence(
            self.docs[i], self.cfg, self.ids, self.n_patches, self.encode, np.random.default_rng([self.seed, epoch, i])
        )


class EpochBatches(torch.utils.data.Sampler):
    """Micro-batches of `batch_size` items `epoch·n + perm_epoch[j]`, endless, from micro-batch `start`."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start

    def __iter__(self) -> Iterator[list[int]]:
        perm: tuple[int, np.ndarray] | None = None
        for k in itertools.count(self.start):
            out = []
            for g in range(k * self.batch_size, (k + 1) * self.batch_size):
                epoch, j = divmod(g, self.n)
                if perm is None or perm[0] != epoch:
                    perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
                out.append(epoch * self.n + int(perm[1][j]))
            yield out

    def __len__(self) -> int:  # endless; the trainer stops by step count
        return 2**62


class Collator:
    """Right-padded LCL batch (see `lcl.sequence.collate`), in the engine's batch format."""

    def __init__(self, pad_id: int, images: ImageCache):
        self.pad_id, self.images = pad_id, images

    def __call__(self, samples: list[dict]) -> dict:
        return {**collate(samples, self.pad_id, self.images), "skipped": Counter()}


class ShardBatches:
    """This process's micro-batches from webdataset shards (already sliced: the engine does not re-slice)."""

    per_rank = True

    def __init__(
        self,
        urls: list[tuple[str, bool]],
        build: Callable,
        collator: Collator,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        start: int = 0,
    ):
        self.mine = [u for i, u in enumerate(urls) if i % world == rank]
        if not self.mine:
            raise RecipeError(f"{len(urls)} shard(s) for {world} processes: need at least one each")
        k, extra = divmod(batch_size, world)  # as the engine slices a micro-batch: the first `extra` take one more
        self.share = k + (rank < extra)
        if self.share == 0:
            raise RecipeError(f"a micro-batch of {batch_size} documents cannot be split over {world} processes")
        self.build, self.collator, self.seed, self.start = build, collator, seed, start

    def _stream(self) -> Iterator[dict]:
        for epoch in itertools.count():
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.mine))
            for j in order:
                url, pairs = self.mine[j]
                for k, doc in enumerate(iter_shards([url])):
                    for d in as_pairs([doc]) if pairs else [doc]:
                        yield self.build(d, np.random.default_rng([self.seed, epoch, int(j), k]))

    def __iter__(self) -> Iterator[dict]:
        stream = self._stream()
        for _ in range(self.start * self.share):
            next(stream)
        while True:
            yield self.collator([next(stream) for _ in range(self.share)])
