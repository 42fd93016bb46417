"""Data at scale: records located by byte offsets, indexed once (cached), tokenised when read; the
same samples, ids and labels as tokenising every record up front; exact resume with loader workers."""

from __future__ import annotations

import json
import random
import re
import zlib
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
    monkeypatch.setattr(record_file, "_list_marks", lambda *a: pytest.fail("scanned a file whose index is cached"))
    again = ConversationDataset(path, world["images"], proc)
    assert np.array_equal(first.lengths, again.lengths) and lazy(first) == lazy(again)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_indexing_while_locating_gives_the_same_index_and_errors(world, proc, monkeypatch, tmp_path):
    """A big JSON list is indexed by forked workers while the byte pass is still finding its records (here:
    every file, 6 records a job, the file read 300 bytes at a time): the same index, offsets and errors
    as locating first and indexing in this process."""
    bad = {"id": "b", "conversations": [{"from": "human", "value": "<|im_end|>"}, {"from": "gpt", "value": "x"}]}
    records = read_llava_json(world["manifest"]["train"]["vqa"])[0]
    files = {
        "empty": "[ ]",
        "one": json.dumps([records[0]]),
        "records": json.dumps(records, indent=1),
        "bad": json.dumps(records[:20] + [bad, 7] + records[20:40]),
        "broken": json.dumps(records[:9])[:-40],
    }
    got = {}
    for name, text in files.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        try:
            alone = record_index.build_index(record_file.RecordFile(path), proc, workers=1)
            offsets = record_file.RecordFile(path).located()
        except DataError as e:
            alone = e
        with monkeypatch.context() as m:
            m.setattr(record_index, "STREAM_BYTES", 0)
            m.setattr(record_index, "SPAN", 6)
            m.setattr(record_file, "CHUNK", 300)
            store = record_file.RecordFile(path)
            try:
                got[name] = streamed = record_index.build_index(store, proc, workers=2)
            except DataError as e:
                assert isinstance(alone, DataError) and (type(e), str(e)) == (type(alone), str(alone)), name
                got[name] = e
                continue
        assert not isinstance(alone, DataError), name
        for key in ("rows", "length", "images"):
            assert np.array_equal(alone[key], streamed[key]), (name, key)
        assert {k: alone[k] for k in ("truncated", "skipped", "first_error")} == {
            k: streamed[k] for k in ("truncated", "skipped", "first_error")
        }, name
        assert all(np.array_equal(offsets[k], v) for k, v in store.located().items()), name
    assert len(got["empty"]["rows"]) == 0 and len(got["one"]["rows"]) == 1 and len(got["records"]["rows"]) > 30
    assert got["bad"]["skipped"] == {"special token in text": 1, "not an object": 1}
    assert isinstance(got["broken"], record_file.MalformedFile)


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
    alphabet = ["a", '"', "\\", "[", "]", "{", "}", ",", " ", "\n", "é", "\u2028"]

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
        text = json.dumps(
            [value() for _ in range(rng.randint(0, 5))], ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1])
        )
        if rng.random() < 0.3:
            i = rng.randrange(len(text))
            text = text[:i] + rng.choice(alphabet + ["", "1"]) + text[i + 1 :]
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
    data["sources"] = {
        "captions": {
            "jsonl": str(as_jsonl(world["manifest"]["train"]["caption"], tmp_path / "captions.jsonl")),
            "images": world["images"],
        }
    }
    stage = {
        **data["stages"][0],
        "data": {"captions": 1.0, "world/train/vqa": 1.0},
        "steps": 10,
        "batch_size": 4,
        "group_by_length": loader.get("group_by_length", 0),
    }
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
    atoms = [
        "the",
        "cat",
        "'s",
        "don't",
        "123",
        "4567",
        "3.14",
        ",",
        "?",
        "!!",
        "\n",
        "\t",
        "\r\n",
        "é",
        "日本",
        "<|im_start|>",
        "<|im_end|>",
        "<image>",
        "user",
        "\x1c",
        "\x00",
        "a-b",
        "(x)",
        '"q"',
        "Hello",
        "😀",
        "\u00a0",
        "\u2028",
        "x" * 30,
        "`",
        "@#$%",
    ]
    texts = []
    for ascii_only in (False, True):
        pool = [a for a in atoms if a.isascii() or not ascii_only]
        for _ in range(600):
            texts.append(
                "".join(
                    rng.choice(pool) + rng.choice([" ", " ", " ", "", "  ", "\n", " \n", "   "])
                    for _ in range(rng.randint(0, 30))
                )
            )
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
    assert [str(x) if isinstance(x, DataError) else tuple(x) for x in got] == [
        str(x) if isinstance(x, DataError) else x for x in want
    ]
    assert [x.kind for x in got if isinstance(x, DataError)] == [x.kind for x in want if isinstance(x, DataError)]


# -- the fast index path: shaped rendering and bulk counting are exact -----------------------------
VERBATIM = [
    "{% for m in messages %}{{ '<|im_start|>' ~ m.role ~ '\\n' ~ m.content ~ '<|im_end|>\\n' }}{% endfor %}",
    "{% if messages[0]['role'] == 'system' %}{{ '<|endoftext|>' }}{% endif %}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) and m['role'] != 'system' %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}{% if m['role'] == 'assistant' %}"
    "{{ ' [A] ' + m['content'] + '<|im_end|>' }}{% else %}{{ '[' + m['role'] + '] ' + m['content'] }}{% endif %}"
    "{% if loop.last %}{{ '\\n' }}{% endif %}{% endfor %}",
]
NOT_VERBATIM = [
    "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] | trim }}<|endoftext|>{% endfor %}",
    "{% for m in messages %}{{ m['content'].strip() }}{% endfor %}",
    "{% for m in messages %}{% if m['content'] %}x{% endif %}{{ m['content'] }}{% endfor %}",
    "{% set rest = messages[1:] %}{% for m in rest %}{{ m['content'] }}{% endfor %}",
    "{% for m in messages %}{{ m | tojson }}{% endfor %}",
    "{% for m in messages %}{% set c = m['content'] %}{{ c }}{% endfor %}",
    "{% macro say(m) %}{{ m['content'] }}{% endmacro %}{% for m in messages %}{{ say(m) }}{% endfor %}",
    "{% for m in messages %}{{ m['content'] }}{{ raise_exception(m['content']) if loop.last }}{% endfor %}",
    "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}",
]
AWKWARD = [
    "the",
    "cat",
    "don't",
    "3.14",
    ",",
    "?",
    "\n",
    "\t",
    " ",
    "  ",
    "\r\n",
    "é",
    "日本",
    "😀",
    "\u00a0",
    "<image>",
    "<repo_name>",
    "{{ x }}",
    "{% raw %}",
    '"q"',
    "\\",
    "\x1c",
    "\x7f",
    "x" * 17,
    "abcdefgh",
    "\ue000",
    "Hello",
    "  \n",
    "user",
    "\n\n",
]


def random_conversation(rng: random.Random, images: int = 1) -> list[dict]:
    def text(lo=0):
        return "".join(rng.choice(AWKWARD) + rng.choice(["", " ", " ", "  ", "\n"]) for _ in range(rng.randint(lo, 12)))

    turns = [{"from": "system", "value": text()}] if rng.random() < 0.2 else []
    for r in range(rng.randint(1, 5)):
        question = text()
        if r == 0 and images:
            question = rng.choice(["<image>\n", "<image>", "", "\n<image> "]) + question
            question = question if "<image>" in question else question + "<image>"
        turns.append({"from": rng.choice(["human", "human", "human", "gpt"]), "value": question})
        turns.append({"from": "gpt", "value": rng.choice(["", " ok ", "red"]) + text(1)})
    if rng.random() < 0.03:
        turns[-1]["value"] += "<|im_end|>"
    return turns


def outcome(f, *args):
    try:
        return f(*args)
    except DataError as e:
        return type(e), e.kind, str(e)


def test_only_templates_that_print_contents_verbatim_are_shaped(tokenizer):
    from mmbridge.data.chat_shape import content_printed_verbatim

    assert content_printed_verbatim(tokenizer.chat_template)  # SmolLM2's
    assert all(content_printed_verbatim(t) for t in VERBATIM)
    assert not any(content_printed_verbatim(t) for t in NOT_VERBATIM + [None, ""])


@pytest.mark.parametrize("template", [None, *VERBATIM, NOT_VERBATIM[0]])
@pytest.mark.parametrize("system_prompt", [None, "", "Be brief. "])
def test_shaped_rendering_gives_the_templates_text_and_spans(tokenizer, template, system_prompt):
    """Random conversations (multi-turn, system turns, unicode, odd spacing, image placeholders, Jinja-like
    text, template errors): text, answer spans and errors as the template renders them."""
    from tests.test_processor import make

    proc = make(tokenizer, template=template, system_prompt=system_prompt)
    slow = make(tokenizer, template=template, system_prompt=system_prompt)
    slow._verbatim = False  # every conversation through the template
    rng = random.Random(zlib.crc32(repr((template, system_prompt)).encode()) % 1000)  # the same in every process
    for i in range(300):
        conv = random_conversation(rng)
        assert outcome(proc._prepare, conv, f"r{i}") == outcome(slow._prepare, conv, f"r{i}"), conv
    assert proc._verbatim == (template in (None, *VERBATIM))
    if proc._verbatim:
        assert len(proc._shapes) > 5  # and each shape was compared with the template once


def test_a_wrongly_shaped_template_is_caught_by_its_first_rendering(tokenizer, monkeypatch):
    import mmbridge.data.chat_shape as chat_shape
    from tests.test_processor import make

    monkeypatch.setattr(chat_shape, "content_printed_verbatim", lambda template: True)  # a wrong proof
    proc = make(tokenizer, template=NOT_VERBATIM[0])
    slow = make(tokenizer, template=NOT_VERBATIM[0])
    slow._verbatim = False
    conv = [{"from": "human", "value": " hi "}, {"from": "gpt", "value": "yes  "}]
    assert proc._prepare(conv, "x") == slow._prepare(conv, "x") and proc._verbatim is False


def test_bulk_piece_counts_equal_the_tokenizer(proc, monkeypatch):
    """ASCII texts counted in bulk (joined, looked up in the table of pieces) as the tokenizer counts them:
    control characters, runs of spaces, added tokens, pieces longer than the table's keys, empty texts;
    with groups cut small and a table too small for every piece (slots taken, table full)."""
    from mmbridge.data.token_count import PieceCounter

    rng = random.Random(3)
    atoms = [a for a in AWKWARD if a.isascii()] + [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "\x00",
        "a" * 15,
        "b" * 16,
        "cdefghi",
        "123456789",
        "'s",
        "!!",
        "(x)",
    ]
    texts = [""] + [
        "".join(
            rng.choice(atoms) + rng.choice([" ", " ", " ", "", "  ", "\n", " \n"]) for _ in range(rng.randint(0, 40))
        )
        for _ in range(1500)
    ]
    texts.append("é " + texts[5])  # not ASCII: counted alone
    want = [len(proc.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    alone = PieceCounter.build(proc.tokenizer)
    alone.bulk = False
    assert alone.count(texts) == want
    for chars, table in ((1 << 19, 1 << 21), (300, 8)):
        monkeypatch.setattr(PieceCounter, "BULK_CHARS", chars)
        monkeypatch.setattr(PieceCounter, "MAX_TABLE", table)
        counter = PieceCounter.build(proc.tokenizer)
        assert counter.bulk
        assert counter.count(texts) == want
        assert counter.count(texts[::-1]) == want[::-1]  # from the table and the memo this time
        assert counter.count(texts[:3]) == want[:3]  # fewer than BULK_MIN: one by one
    # prefixes that end just after an added token, counted with their texts
    cuts = [[m.end() for m in re.finditer(r"<\|im_end\|>|<image>|<\|endoftext\|>", t)][:3] for t in texts]
    cuts = [[0, *c] if k % 2 else c for k, c in enumerate(cuts)]
    got, at = counter.count_with_prefixes(texts, cuts)
    assert got == want and sum(map(len, cuts)) > 1000
    assert at == [
        [len(proc.tokenizer(t[:p], add_special_tokens=False)["input_ids"]) for p in c] for t, c in zip(texts, cuts)
    ]
    assert alone.count_with_prefixes(texts, cuts) == (got, at)
    some = counter.count_with_prefixes(texts, cuts, over=[20] * len(texts))[1]  # only those of texts over 20
    assert all(s == a if n > 20 else s in (None, a) for s, a, n in zip(some, at, want))
    assert sum(s is None for s in some) > 100


@pytest.mark.parametrize("n, max_length", [(4, 60), (16, 100), (4, 400)])
def test_measured_lengths_equal_encoding_on_random_conversations(tokenizer, n, max_length):
    """`measure_many` (shaped rendering, bulk counting) against `encode_many` (the template and the
    tokenizer) on random conversations, shortened ones and every error included."""
    from tests.test_processor import make

    p, slow = make(tokenizer, n=n, max_length=max_length), make(tokenizer, n=n, max_length=max_length)
    slow._verbatim = False  # every conversation through the template
    rng = random.Random(n + max_length)
    items = []
    for i in range(400):
        conv = random_conversation(rng, images=rng.choice([0, 1, 1, 1]))
        items.append((conv, sum(t["value"].count("<image>") for t in conv) - (rng.random() < 0.05), f"r{i}"))
    want = [e if isinstance(e, DataError) else (len(e.input_ids), e.truncated) for e in slow.encode_many(items)]
    got = p.measure_many(items)
    assert p._verbatim and p._counter is not None and p._counter.bulk
    assert [(type(x), x.kind, str(x)) if isinstance(x, DataError) else tuple(x) for x in got] == [
        (type(x), x.kind, str(x)) if isinstance(x, DataError) else x for x in want
    ]
    assert sum(not isinstance(x, DataError) for x in want) > 100
