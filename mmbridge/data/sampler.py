"""Seeded, resumable orders over a stage's sources: the mixture stream and length-grouped batches."""

from __future__ import annotations

import numpy as np
import torch

from mmbridge.data.llava import DataError


class MixtureSampler(torch.utils.data.Sampler):
    """An endless, seeded stream of indices into the concatenation of several datasets.

    The stream is cut into blocks of `chunk` draws. Before block k, dataset d has been drawn
    exactly floor(k * chunk * p_d) times (p ∝ the weights; the heaviest dataset takes the rest),
    and each block is shuffled with a generator seeded by (seed, k). Each dataset is read in a
    seeded permutation, re-drawn each pass. Any block is thus computed from its number alone:
    the cost per index is the same at step 0 and at step 10^6, and a resumed run that skips
    `start` indices sees exactly the uninterrupted order. Proportions are exact to within one
    draw per dataset, where independent draws would wander.
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int, start: int = 0, chunk: int = 4096):
        if any(n == 0 for n in sizes):
            raise DataError(f"a data source in the mixture has no usable samples (sizes {sizes})", "empty source")
        w = np.asarray(weights, dtype=np.float64)
        if len(w) != len(sizes) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights {list(weights)} for sources of sizes {list(sizes)}")
        self.sizes, self.seed, self.start, self.chunk = [int(n) for n in sizes], seed, start, chunk
        self.probs = w / w.sum()
        self.rest = int(np.argmax(self.probs))  # its count is what the others leave: never negative below
        if chunk * self.probs[self.rest] < len(sizes) - 1:
            raise ValueError(f"chunk={chunk} is too small for {len(sizes)} sources with weights {list(weights)}")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def drawn_before(self, k: int) -> np.ndarray:
        """How often each dataset is drawn in blocks 0 .. k-1 (O(1) in k)."""
        counts = np.floor(float(k * self.chunk) * self.probs).astype(np.int64)
        counts[self.rest] = k * self.chunk - (counts.sum() - counts[self.rest])
        return counts

    def _perm(self, d: int, p: int) -> np.ndarray:
        """Pass `p` over dataset `d`: a seeded permutation (the last few are kept)."""
        key = (d, p)
        if key not in self._perms:
            if len(self._perms) >= 2 * len(self.sizes) + 8:
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = np.random.default_rng([self.seed, d, p]).permutation(self.sizes[d])
        return self._perms[key]

    def block(self, k: int) -> np.ndarray:
        """Indices [k*chunk, (k+1)*chunk) of the stream."""
        before, after = self.drawn_before(k), self.drawn_before(k + 1)
        which = np.repeat(np.arange(len(self.sizes)), after - before)
        np.random.default_rng([self.seed, k]).shuffle(which)
        out = np.empty(self.chunk, dtype=np.int64)
        for d, n in enumerate(self.sizes):
            pos = np.flatnonzero(which == d)
            passes, within = np.divmod(before[d] + np.arange(len(pos)), n)
            for p in np.unique(passes):
                sel = passes == p
                out[pos[sel]] = self.offsets[d] + self._perm(d, int(p))[within[sel]]
        return out

    def __iter__(self):
        k, skip = divmod(self.start, self.chunk)
        while True:
            yield from self.block(k)[skip:].tolist()
            k, skip = k + 1, 0

    def __len__(self) -> int:  # endless; the trainer stops by step count
        return 2**62


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of similar length, to waste less compute on padding.

    Takes `window` batches' worth of the mixture stream at a time, sorts them by token count,
    cuts them into batches and shuffles the batch order (seeded). Resuming at batch `start`
    regenerates its window and skips into it, so the order is the same as uninterrupted.
    """

    def __init__(self, lengths, sampler_args: dict, batch_size: int, window: int = 16, start: int = 0):
        self.lengths = np.asarray(lengths)
        self.sampler_args, self.batch_size, self.window, self.start = sampler_args, batch_size, window, start

    def __iter__(self):
        w, skip = divmod(self.start, self.window)
        per_window = self.batch_size * self.window
        stream = iter(MixtureSampler(**self.sampler_args, start=w * per_window))
        while True:
            idx = np.fromiter(stream, dtype=np.int64, count=per_window)
            idx = idx[np.argsort(self.lengths[idx], kind="stable")]
            batches = idx.reshape(self.window, self.batch_size)
            order = np.random.default_rng([self.sampler_args["seed"], 7919, w]).permutation(self.window)
            for b in order[skip:]:
                yield batches[b].tolist()
            w, skip = w + 1, 0

    def __len__(self) -> int:
        return 2**62
