"""Data at scale: records located by byte offsets, indexed once (cached), tokenised when read; the
same samples, ids and labels as tokenising every record up front; exact resume with loader workers."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import mmbridge.data.record_file as record_file
import mmbridge.data.record_index as record_index
from mmbridge.config import recipe_from_dict
from mmbridge.data.dataset import ConversationDataset
from mmbridge.data.llava import DataError, read_llava_json, record_images
from mmbridge.data.shards import write_shards
from tests.conftest import interrupted_run, tiny_recipe_dict
from tests.test_processor import make

TASKS = ("caption", "vqa", "grounding")


@pytest.fixture(scope="module")
def proc(tokenizer):
    return make(tokenizer, n=4, max_length=96)


def eager(path, proc, skip_bad=False):
    """What the eager path gave: every record read, checked and tokenised up front."""
    records, skipped = read_llava_json(path, skip_bad=skip_bad)
    out, skipped, truncated = {}, Counter(skipped), 0
    for i, rec in enumerate(records):
        try:
            enc = proc.encode(rec["conversations"], len(record_images(rec)), f"{path}: record {i} (id {rec['id']})")
        except DataError as e:
            if not skip_bad:
                raise
            skipped[e.kind] += 1
            continue
        out[str(rec["id"])] = (enc.input_ids, enc.labels, len(record_images(rec)))
        truncated += enc.truncated
    return out, skipped, truncated


def as_jsonl(path: Path, out: Path) -> Path:
    out.write_text("".join(json.dumps(r) + "\n\n" for r in json.loads(Path(path).read_text())))
    return out


def lazy(ds: ConversationDataset) -> dict:
    got = {}
    for k, s in enumerate(ds.samples):
        assert len(s["input_ids"]) == ds.lengths[k] and len(s["images"]) == ds.n_images[k]
        got[s["id"]] = (s["input_ids"], s["labels"], len(s["images"]))
    return got


@pytest.mark.parametrize("task", TASKS)
def test_the_built_in_data_gives_the_eager_samples_from_json_jsonl_and_shards(world, proc, task, tmp_path):
    path = world["manifest"]["train"][task]
    want, _, truncated = eager(path, proc)  # max_length 96 shortens some: truncation is compared too
    ds = ConversationDataset(path, world["images"], proc)
    assert lazy(ds) == want and ds.truncated == truncated
    assert lazy(ConversationDataset(as_jsonl(path, tmp_path / "d.jsonl"), world["images"], proc)) == want
    write_shards(path, world["images"], tmp_path / "shards", per_shard=7)
    shards = ConversationDataset(tmp_path / "shards", "", proc)
    assert lazy(shards) == want
    for k in (0, len(ds) - 1):  # the same pixels from a shard member as from the file
        assert np.array_equal(shards[k]["pixel_values"], ds[k]["pixel_values"])


def test_forked_index_workers_and_the_cache_agree(world, proc, monkeypatch, tmp_path):
    path = world["manifest"]["train"]["vqa"]
    monkeypatch.setenv("MMBRIDGE_INDEX_CACHE", str(tmp_path / "cache"))
    alone = record_index.build_index(record_file.RecordFile(path), proc, workers=1)
    monkeypatch.setattr(record_index, "SPAN", 6)
    monkeypatch.setattr(record_index, "MIN_PER_WORKER", 1)
    forked = record_index.build_index(record_file.RecordFile(path), proc, workers=2)
    for key in ("rows", "length", "images"):
        assert np.array_equal(alone[key], forked[key])
    first = ConversationDataset(path, world["images"], proc)
    monkeypatch.setattr(record_index, "build_index", lambda *a, **k: pytest.fail("rebuilt a cached index"))
    monkeypatch.setattr(record_file, "_split_list", lambda *a: pytest.fail("scanned a file whose index is cached"))
    again = ConversationDataset(path, world["images"], proc)
    assert np.array_equal(first.lengths, again.lengths) and lazy(first) == lazy(again)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_bad_records_are_named_or_counted_as_before(proc, tmp_path):
    good = {"id": "g", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]}
    special = {"id": "s", "conversations": [{"from": "human", "value": "<|im_end|>"}, {"from": "gpt", "value": "x"}]}
    long = {"id": "l", "conversations": [{"from": "human", "value": "why? " * 200}, {"from": "gpt", "value": "ok"}]}
    records = [good, special, {"id": "n", "conversations": []}, long, good, 7]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError) as want:
        eager(path, proc)
    with pytest.raises(DataError) as got:
        ConversationDataset(path, tmp_path, proc)
    assert str(got.value) == str(want.value) and got.value.kind == want.value.kind
    want_samples, want_skipped, _ = eager(path, proc, skip_bad=True)
    ds = ConversationDataset(path, tmp_path, proc, skip_bad=True)
    assert ds.skipped == want_skipped and len(ds) == 2 and lazy(ds) == want_samples
    # only encoding errors left: the first is named, with its record number in the file
    path.write_text(json.dumps([good, good, special]))
    with pytest.raises(DataError, match=r"mixed\.json: record 2 \(id s\): a user turn contains the special token"):
        ConversationDataset(path, tmp_path, proc)
    # a JSONL line that is not JSON is named by its line, or counted
    lines = tmp_path / "d.jsonl"
    lines.write_text(json.dumps(good) + "\n\n{oops\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl: line 3: malformed JSON at column 2"):
        ConversationDataset(lines, tmp_path, proc)
    assert ConversationDataset(lines, tmp_path, proc, skip_bad=True).skipped == {"malformed JSON": 1}


def test_the_byte_pass_splits_any_json_list_as_json_does(tmp_path, monkeypatch):
    """Random lists whose strings hold quotes, backslashes, brackets and commas, cut into tiny chunks;
    a corrupted file raises exactly the whole-file reader's error."""
    rng = random.Random(0)
    alphabet = ['a', '"', '\\', '[', ']', '{', '}', ',', ' ', '\n', 'é', '\u2028']

    def value(depth=0):
        r = rng.random()
        if depth > 2 or r < 0.3:
            return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        if r < 0.4:
            return rng.randint(-5, 5)
        if r < 0.7:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {str(value(3)): value(depth + 1) for _ in range(rng.randint(0, 3))}

    path = tmp_path / "f.json"
    for trial in range(400):
        monkeypatch.setattr(record_file, "CHUNK", rng.choice([1, 2, 3, 5, 64, 1 << 20]))
        text = json.dumps([value() for _ in range(rng.randint(0, 5))], ensure_ascii=rng.random() < 0.5,
                          indent=rng.choice([None, 1]))
        if rng.random() < 0.3:
            i = rng.randrange(len(text))
            text = text[:i] + rng.choice(alphabet + ["", "1"]) + text[i + 1:]
        if rng.random() < 0.1:
            text = "\ufeff \n" + text + "\n"
        path.write_bytes(text.encode())
        try:
            want = json.loads(text.lstrip("\ufeff"))
        except json.JSONDecodeError:
            want = None
        if isinstance(want, list):
            f = record_file.RecordFile(path)
            assert [f.load(i) for i in range(len(f))] == want, (trial, text)
            continue
        with pytest.raises(DataError) as expected:
            read_llava_json(path)
        with pytest.raises(DataError) as got:  # when the records are located, or when they are read
            f = record_file.RecordFile(path)
            [f.load(i) for i in range(len(f))]
        assert str(got.value) == str(expected.value), (trial, text)



def losses(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.parametrize("loader", [{"num_workers": 0}, {"num_workers": 2, "group_by_length": 2}])
def test_resume_mid_epoch_reproduces_the_losses(tiny_lm_dir, tiny_clip_dir, world, tmp_path, loader, one_thread):
    from mmbridge.train.trainer import Trainer

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["sources"] = {"captions": {"jsonl": str(as_jsonl(world["manifest"]["train"]["caption"],
                                                          tmp_path / "captions.jsonl")), "images": world["images"]}}
    stage = {**data["stages"][0], "data": {"captions": 1.0, "world/train/vqa": 1.0}, "steps": 10,
             "batch_size": 4, "group_by_length": loader.get("group_by_length", 0)}
    data.update(stages=[stage], save_every=3, num_workers=loader["num_workers"], log_every=1)
    recipe = recipe_from_dict(data)
    Trainer(recipe, tmp_path / "a", progress=False).run()
    reference = losses(tmp_path / "a")
    assert len(reference) == 10  # 40 samples, 20 of the 40 captions: the resume at step 6 is mid-pass
    interrupted_run(recipe, tmp_path / "b", 8)  # during step 8; the checkpoint is at step 6
    Trainer(recipe, tmp_path / "b", resume=True, progress=False).run()
    resumed = losses(tmp_path / "b")
    assert resumed.keys() == reference.keys()
    for step, want in reference.items():
        assert resumed[step] == pytest.approx(want, rel=1e-6, abs=1e-7), step


def test_piece_counts_equal_the_tokenizer_on_awkward_text(proc):
    from mmbridge.data.token_count import PieceCounter

    counter = PieceCounter.build(proc.tokenizer)
    assert counter is not None  # SmolLM2: byte-level BPE with the GPT-2 pre-tokenizer
    rng = random.Random(1)
    atoms = ["the", "cat", "'s", "don't", "123", "4567", "3.14", ",", "?", "!!", "\n", "\t", "\r\n", "é", "日本",
             "<|im_start|>", "<|im_end|>", "<image>", "user", "\x1c", "\x00", "a-b", "(x)", '"q"', "Hello", "😀",
             "\u00a0", "\u2028", "x" * 30, "`", "@#$%"]
    texts = []
    for ascii_only in (False, True):
        pool = [a for a in atoms if a.isascii() or not ascii_only]
        for _ in range(600):
            texts.append("".join(rng.choice(pool) + rng.choice([" ", " ", " ", "", "  ", "\n", " \n", "   "])
                                 for _ in range(rng.randint(0, 30))))
    want = [len(proc.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert counter.count(texts) == want
    assert counter.count(texts[::-1]) == want[::-1]  # from the memo this time


@pytest.mark.parametrize("n, max_length", [(4, 96), (16, 60), (4, 40)])
def test_measured_lengths_and_errors_equal_encoding(proc, world, n, max_length):
    """`measure_many` (counted) gives what `encode_many` gives: lengths, shortening and every error."""
    from mmbridge.data.processor import Processor

    p = Processor(proc.tokenizer, n, 32, (0.5,) * 3, (0.5,) * 3, max_length=max_length)
    rng = random.Random(n)
    items = []
    for task in TASKS:
        for i, rec in enumerate(read_llava_json(world["manifest"]["train"][task])[0]):
            conv = json.loads(json.dumps(rec["conversations"]))
            fault = rng.random()
            if fault < 0.1:
                conv[0]["value"] = conv[0]["value"].replace("<image>", "")
            elif fault < 0.2:
                conv[0]["value"] = "why " * rng.randint(5, 40) + conv[0]["value"]
            elif fault < 0.3:
                conv[-1]["value"] = "  " + conv[-1]["value"] + "  \n"
            elif fault < 0.35:
                conv[-1]["value"] = "<|im_end|>"
            items.append((conv, 1, f"{task} {i}"))
    want = [e if isinstance(e, DataError) else (len(e.input_ids), e.truncated) for e in p.encode_many(items)]
    got = p.measure_many(items)
    assert [str(x) if isinstance(x, DataError) else tuple(x) for x in got] == \
        [str(x) if isinstance(x, DataError) else x for x in want]
    assert [x.kind for x in got if isinstance(x, DataError)] == [x.kind for x in want if isinstance(x, DataError)]
