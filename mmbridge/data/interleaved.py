"""An interleaved source for LMM stages: MMC4-style documents from a JSONL file or webdataset shards.

Records are located as for conversations (`record_file.RecordFile`: one document a line;
`shards.ShardRecords`: a `json` member per sample whose `image_info` names members of the same
sample, as `lcl.readers.write_shards` writes them). Every document is laid out and measured once
(`documents.DocumentEncoder`), the index cached beside the conversation indexes, so packing and
mixing see exact lengths and bad documents are named (or counted) before training. A sample is
tokenised again when it is read, in the loader's workers, and must come out as long as indexed.
Samples have the same fields as `ConversationDataset`'s, so both mix in one stage and one collator.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbridge.data.dataset import adopt_index, open_source
from mmbridge.data.documents import DocumentEncoder, Dropped
from mmbridge.data.images import ImageError, preprocess
from mmbridge.data.llava import DataError
from mmbridge.data.record_file import MalformedFile
from mmbridge.data.record_index import cached_index, content_hash, fingerprint

VERSION = 1  # bump when what the index holds or how a document is encoded changes
BATCH = 128  # documents per tokenizer call while indexing


def index_documents(store, encoder: DocumentEncoder) -> dict:
    """Every record of `store`: usable or not (and why), exact lengths, image counts (one process)."""
    n = len(store)
    ok, length = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int32)
    images, truncated = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=bool)
    bad: list[tuple[int, str, str]] = []  # (record, kind, message)
    dropped: Counter = Counter()  # documents a layout rule leaves out (openflamingo): counted, not errors
    for a in range(0, n, BATCH):
        items, rows = [], []
        for i in range(a, min(n, a + BATCH)):
            try:
                rec = store.load(i)
                items.append((encoder.pieces(rec, store.place(i, rec), i), store.place(i, rec)))
                rows.append(i)
            except DataError as e:
                if isinstance(e, MalformedFile):
                    raise
                if isinstance(e, Dropped):
                    dropped[e.kind] += 1
                    continue
                bad.append((i, e.kind, str(e)))
        for i, got in zip(rows, encoder.encode_many(items)):
            if isinstance(got, DataError):
                bad.append((i, got.kind, str(got)))
            else:
                ok[i], length[i], images[i], truncated[i] = True, len(got.input_ids), len(got.images), got.truncated
    return {
        "rows": np.flatnonzero(ok).astype(np.int64),
        "length": length[ok],
        "images": images[ok],
        "truncated": int(truncated.sum()),
        "skipped": dict(Counter(k for _, k, _ in bad) + dropped),
        "first_error": list(min(bad)[1:]) if bad else None,
    }


def load_document_index(store, encoder: DocumentEncoder, cache: bool = True) -> dict:
    """The index of `store`, from the cache when the source's bytes and every layout setting are unchanged."""
    settings = json.dumps([VERSION, encoder.settings], sort_keys=True).encode()
    key = (
        f"docs-{store.kind}-{content_hash(store.files)}-{fingerprint(encoder.processor)}-"
        f"{hashlib.sha256(settings).hexdigest()[:12]}"
    )
    return cached_index(store, key, lambda: index_documents(store, encoder), cache)


class InterleavedDataset(Dataset):
    """MMC4-style documents as raw-text samples with images (see `documents.py` for the layout and labels).

    `sequence`: LCL's layout settings (`max_images`, `min_sim`, `image_position`); `seed` draws each
    document's `random` placements. A bridge with its own text side (the Q-Former) gets the document's
    text as `caption_ids` and, per image, the text before it as its instruction."""

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path,
        processor,
        sequence: dict | None = None,
        seed: int = 0,
        skip_bad: bool = False,
        cache: bool = True,
        lines: bool | None = None,
    ):
        self.processor, self.skip_bad = processor, skip_bad
        self.store = open_source(path, image_root, lines)
        self.encoder = DocumentEncoder(processor, sequence, seed)
        adopt_index(self, load_document_index(self.store, self.encoder, cache), skip_bad)

    def __len__(self) -> int:
        return len(self.rows)

    def encoded(self, idx: int) -> dict:
        """Sample `idx` tokenised, its images named but not read."""
        i = int(self.rows[idx])
        rec = self.store.load(i)
        where = self.store.place(i, rec)
        enc = self.encoder.encode_many([(self.encoder.pieces(rec, where, i), where)])[0]
        if isinstance(enc, DataError):
            raise enc
        if len(enc.input_ids) != self.lengths[idx]:
            raise DataError(
                f"{where}: {len(enc.input_ids)} tokens, but the index says {self.lengths[idx]}; "
                f"delete {self.store.name}'s entry in the data-index cache"
            )
        out = {
            "id": str(rec.get("id", self.store.default_id(i))),
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            "images": [self.store.image_ref(i, p) for p in enc.images],
            "names": enc.images,
            "where": where,
            "row": i,
        }
        proc = self.processor
        if proc.text_tokenizer is not None:
            out["caption_ids"] = proc._text_ids(enc.text)
            if proc.instructions:
                out["instruction_ids"] = [proc._text_ids(t) for t in enc.before]
        return out

    def __getitem__(self, idx: int) -> dict:
        s = self.encoded(idx)
        try:
            images = [self.store.image(s["row"], p) for p in s["names"]]
        except ImageError as e:
            kind = getattr(e, "kind", "unreadable image")  # a MediaPathError: a name outside the image root
            if not self.skip_bad:
                raise DataError(f"{s['where']}: {e}", kind) from e
            return {"id": s["id"], "skip": kind}
        size = self.processor.image_size
        pixels = (
            preprocess(images, size, self.processor.image_mean, self.processor.image_std)
            if images
            else torch.zeros(0, 3, size, size)
        )
        return {
            "id": s["id"],
            "input_ids": s["input_ids"],
            "labels": s["labels"],
            "pixel_values": pixels,
            **{k: s[k] for k in ("caption_ids", "instruction_ids") if k in s},
        }
