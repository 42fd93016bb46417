"""What a source holds, computed once: which records are usable, their exact token lengths, their images.

Every record is parsed, checked and measured as training will tokenise it (`Processor.measure_many`),
in worker processes, so a bad record is named (or, with `bad_samples: skip`, counted) before training
as it always was, and packing and length grouping get exact lengths. Only numpy arrays are kept. The
result, with where each record lies in the file, is cached in `~/.cache/mmbridge/data-index/` (or
`$MMBRIDGE_INDEX_CACHE`), keyed by the sha256 of the source's bytes and the processor's settings
(tokenizer, chat template, image tokens, `max_length`, system prompt): a second run only hashes the file.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing as mp
import os
import signal
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from mmbridge.data.images import ImageError
from mmbridge.data.llava import DataError, check_record, record_images
from mmbridge.data.record_file import MalformedFile
from mmbridge.data.video import record_units

VERSION = 4  # bump when what the index holds or how a record is encoded changes (4: media names checked)
BATCH = 512  # conversations measured at a time
SPAN = 4096  # records per job of an index worker
MIN_PER_WORKER = 2000  # fewer records than this per worker: index in this process
STREAM_BYTES = 64 << 20  # a JSON list this big is indexed while it is located (smaller: located first)
_JOB: dict = {}  # what forked index workers read (the store and the processor)


def fingerprint(processor) -> str:
    """Hash of every processor setting a record's tokens depend on."""
    tok = processor.tokenizer
    backend = tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else repr(sorted(tok.get_vocab()))
    parts = [
        VERSION,
        backend,
        tok.chat_template,
        processor.num_image_tokens,
        processor.max_length,
        processor.system_prompt,
        processor.image_token_id,
        processor._expand,
        type(processor).__name__,
    ]
    if getattr(processor, "modality_prefix", False):  # LaVIN's "Image: N/A" (only when on: older caches hold)
        parts.append("modality_prefix")
    tiling = getattr(processor, "tiling", None)
    if tiling is not None and tiling.varies:  # each image's count follows its size, the tiling and S
        parts += [tiling.key, processor.image_size]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def content_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:24]


def image_counts(store, processor, i: int, units: list[list], where: str) -> list[int]:
    """Record `i`'s images' spans (`Processor.image_counts`), from their sizes under the processor's tiling."""
    if not processor.tiling.by_size:  # the same views for every image: no need to read them
        return processor.image_counts([(0, 0)] * len(units))
    try:
        frames = store.frames(i, units)
    except ImageError as e:
        raise DataError(f"{where}: {e}", getattr(e, "kind", "unreadable image")) from e
    return processor.image_counts([im.size for im in frames])


def _relative(message: str, name: str) -> str:
    return message[len(name) + 2 :] if message.startswith(name + ": ") else message


def index_range(store, processor, a: int, b: int) -> dict:
    """Records [a, b) of `store`: usable or not (and why), exact lengths, image counts."""
    collecting = gc.isenabled()
    gc.disable()  # parsed records hold no cycles: the collector's passes over them would find nothing
    try:
        return _index_range(store, processor, a, b)
    finally:
        if collecting:
            gc.enable()


def _index_range(store, processor, a: int, b: int) -> dict:
    n = b - a
    ok, length = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int32)
    images, truncated = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=bool)
    bad: list[tuple[int, str, str, str]] = []  # (record, "record" | "encode", kind, message)
    items, at = [], []
    for i in range(a, b):
        try:
            rec, plain = store.load_plain(i)
            where = store.place(i, rec)
            check_record(rec, where, plain)
        except DataError as e:
            if isinstance(e, MalformedFile):
                raise
            bad.append((i, "record", e.kind, _relative(str(e), store.name)))
            continue
        paths = record_images(rec)
        images[i - a] = len(paths)
        counts = None
        if paths and getattr(processor, "tiling", None) is not None and processor.tiling.varies:
            try:  # the tokens of each image follow its size: read it
                counts = image_counts(store, processor, i, record_units(rec), where)
            except DataError as e:
                bad.append((i, "record", e.kind, _relative(str(e), store.name)))
                continue
        items.append((rec["conversations"], len(paths), where, counts))
        at.append(i - a)
    for s in range(0, len(items), BATCH):
        for j, got in zip(at[s : s + BATCH], processor.measure_many(items[s : s + BATCH])):
            if isinstance(got, DataError):
                bad.append((a + j, "encode", got.kind, _relative(str(got), store.name)))
            else:
                ok[j], (length[j], truncated[j]) = True, got
    return {"ok": ok, "length": length, "images": images, "truncated": truncated, "bad": bad}


def _job(span: tuple) -> dict:
    """Index records [a, b) in a forked worker; `offsets`: where they lie, for a store forked before it
    had located them (kept in arrays that grow with the jobs, as `store.restore` takes them)."""
    a, b, offsets = span
    store = _JOB["store"]
    if offsets is not None:
        have = _JOB.setdefault("offsets", {})
        for key, part in offsets.items():
            held = have.get(key, part[:0])
            if len(held) < b:
                held = np.concatenate([held, np.zeros(max(b, 2 * len(held)) - len(held), dtype=part.dtype)])
            held[a:b] = part
            have[key] = held
        store.restore(have)
    return index_range(store, _JOB["processor"], a, b)


def _streamed(store, processor, pool) -> list:
    """Index the records of `store` while they are located: a job of SPAN records goes to the pool as
    soon as the byte pass has found them."""
    jobs, waiting, a = [], [], 0
    for starts, ends, numbers in store.locate_stream():
        waiting.append((starts, ends, numbers))
        found = sum(len(w[0]) for w in waiting)
        while found >= SPAN:
            s, e, n = (np.concatenate(x) for x in zip(*waiting))
            k = min(SPAN, len(s))
            offsets = {"starts": s[:k], "ends": e[:k], "numbers": n[:k]}
            jobs.append(pool.apply_async(_job, ((a, a + k, offsets),)))
            a, waiting, found = a + k, [(s[k:], e[k:], n[k:])], found - k
    if sum(len(w[0]) for w in waiting):  # the last records
        s, e, n = (np.concatenate(x) for x in zip(*waiting))
        jobs.append(pool.apply_async(_job, ((a, a + len(s), {"starts": s, "ends": e, "numbers": n}),)))
    return [job.get() for job in jobs]


def _default_signals() -> None:
    """A forked index worker must not inherit a training run's SIGTERM handler (which only asks for a checkpoint):
    the pool stops its workers with SIGTERM, and one that ignored it would hang the run. Ctrl-C is the parent's."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_index(store, processor, workers: int | None = None) -> dict:
    """Index every record of `store`, in `workers` forked processes (default: the CPU count). A JSON list
    of STREAM_BYTES or more is indexed while the byte pass locates its records."""
    workers = workers or os.cpu_count() or 1
    fork = "fork" in mp.get_all_start_methods()
    stream = (
        workers > 1
        and fork
        and hasattr(store, "locate_stream")
        and sum(os.path.getsize(f) for f in store.files) >= STREAM_BYTES
    )
    if not stream:
        n = len(store)
        workers = min(workers, max(1, n // MIN_PER_WORKER))
        spans = [(a, min(n, a + SPAN), None) for a in range(0, n, SPAN)]
    if not stream and (workers <= 1 or not fork):
        parts = [index_range(store, processor, a, b) for a, b, _ in spans]
    else:
        _JOB.update(store=store, processor=processor)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            with mp.get_context("fork").Pool(workers, initializer=_default_signals) as pool:
                parts = _streamed(store, processor, pool) if stream else pool.map(_job, spans, chunksize=1)
        finally:
            _JOB.clear()
    parts = parts or [index_range(store, processor, 0, 0)]
    ok = np.concatenate([p["ok"] for p in parts])
    bad = [b for p in parts for b in p["bad"]]
    first = {c: next(([kind, msg] for _, cls, kind, msg in bad if cls == c), None) for c in ("record", "encode")}
    return {
        "rows": np.flatnonzero(ok).astype(np.int64),
        "length": np.concatenate([p["length"] for p in parts])[ok],
        "images": np.concatenate([p["images"] for p in parts])[ok],
        "truncated": int(np.concatenate([p["truncated"] for p in parts]).sum()),
        "skipped": dict(Counter(kind for _, _, kind, _ in bad)),
        "first_error": first["record"] or first["encode"],
    }


def cache_dir() -> Path:
    """`$MMBRIDGE_INDEX_CACHE`, else `data-index/` in mmbridge's cache folder."""
    from mmbridge.core import cache_root

    return Path(os.environ.get("MMBRIDGE_INDEX_CACHE") or cache_root() / "data-index")


def cached_index(store, key: str, build, cache: bool = True) -> dict:
    """`build()`'s index of `store`, kept as `<key>.npz` in `cache_dir()` with where the store's records lie, and
    read from there while the key (the source's bytes and every setting that changes the index) is the same."""
    path = cache_dir() / f"{key}.npz" if cache else None
    if path is not None and path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                store.restore({k[6:]: z[k] for k in z.files if k.startswith("store_")})
                return {"rows": z["rows"], "length": z["length"], "images": z["images"], **meta}
        except (OSError, ValueError, KeyError):
            pass  # unreadable: rebuilt below
    index = build()
    if path is not None:
        meta = {k: index[k] for k in ("truncated", "skipped", "first_error")}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                rows=index["rows"],
                length=index["length"],
                images=index["images"],
                meta=np.array(json.dumps(meta)),
                **{f"store_{k}": v for k, v in store.located().items()},
            )
        os.replace(tmp, path)
    return index


def load_index(store, processor, workers: int | None = None, cache: bool = True) -> dict:
    """The index of `store` for `processor`, from the cache when the bytes and settings are unchanged."""
    key = f"{store.kind}-{content_hash(store.files)}-{fingerprint(processor)}"
    return cached_index(store, key, lambda: build_index(store, processor, workers), cache)
