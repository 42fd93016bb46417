"""Hugging Face `datasets` sources (data/hf_source.py): saved folders, parquet and arrow files, images as bytes,
paths or Image features, `conversations` and `messages` layouts, all giving the samples of the same LLaVA JSON."""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from collections import Counter

os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="mmbridge-hf-"))  # not the user's cache

import pytest
import torch

datasets = pytest.importorskip("datasets")

from mmbridge.config import RecipeError, recipe_from_dict  # noqa: E402
from mmbridge.data.dataset import Collator, ConversationDataset  # noqa: E402
from mmbridge.data.hf_source import HFRecords  # noqa: E402
from mmbridge.data.llava import DataError, record_images  # noqa: E402
from tests.conftest import tiny_recipe_dict  # noqa: E402
from tests.test_processor import make  # noqa: E402

datasets.disable_progress_bars()
TURN = [{"from": datasets.Value("string"), "value": datasets.Value("string")}]
PART = {"type": datasets.Value("string"), "text": datasets.Value("string")}
MESSAGE = [{"role": datasets.Value("string"), "content": [PART]}]


@pytest.fixture(scope="module")
def records(world):
    """Multi-turn world records, one with two images and one with none (as LLaVA JSON records)."""
    recs = json.loads(open(world["manifest"]["train"]["mixed"]).read())[:10]
    two = {
        "id": "two",
        "image": [recs[0]["image"], recs[1]["image"]],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nAre these the same picture?"},
            {"from": "gpt", "value": "no"},
        ],
    }
    none = {
        "id": "text",
        "conversations": [{"from": "human", "value": "Name a shape."}, {"from": "gpt", "value": "a circle"}],
    }
    return recs + [two, none]


def as_messages(conversations):
    """LLaVA turns → OpenAI-style messages (lines that are `<image>` become image parts)."""
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    return [
        {
            "role": role[t["from"]],
            "content": [
                {"type": "image", "text": None} if line == "<image>" else {"type": "text", "text": line}
                for line in t["value"].split("\n")
            ],
        }
        for t in conversations
    ]


def image_column(recs, root, how):
    """Each record's images as `bytes` or `path` values, or as Image-feature dicts holding the bytes (`feature`)
    or a path under `root` (`feature-path`)."""

    def one(name):
        path = os.path.join(root, name)
        return (
            {"bytes": open(path, "rb").read(), "path": None}
            if how == "feature"
            else {"bytes": None, "path": name}
            if how == "feature-path"
            else open(path, "rb").read()
            if how == "bytes"
            else name
        )

    return [[one(n) for n in record_images(r)] for r in recs]


def build(recs, root, how, layout, listed=True):
    """A datasets.Dataset of `recs` (images as `how`; text as `layout`; images a list per row or one)."""
    cells = image_column(recs, root, how)
    value = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}.get(how, datasets.Image())
    if not listed:
        cells = [c[0] if c else None for c in cells]
    text = [r["conversations"] if layout == "conversations" else as_messages(r["conversations"]) for r in recs]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "images": [value] if listed else value,
            layout: TURN if layout == "conversations" else MESSAGE,
        }
    )
    return datasets.Dataset.from_dict({"id": [r["id"] for r in recs], "images": cells, layout: text}, features=features)


def dataset(proc, skip=False, **kw):
    store = HFRecords(images="images", **kw)
    return ConversationDataset(store.name, "", proc, skip_bad=skip, records=store, cache=False)


def assert_same_samples(hf, ref):
    assert len(hf) == len(ref) and list(hf.lengths) == list(ref.lengths)
    for i in range(len(ref)):
        a, b = hf[i], ref[i]
        assert a["id"] == b["id"]
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"], a["id"]
        assert torch.equal(a["pixel_values"], b["pixel_values"]), a["id"]


@pytest.fixture(scope="module")
def proc(tokenizer):
    return make(tokenizer)


@pytest.fixture(scope="module")
def reference(records, world, proc, tmp_path_factory):
    """The records as a LLaVA JSON source, and the dataset it gives."""
    path = tmp_path_factory.mktemp("json") / "data.json"
    path.write_text(json.dumps(records))
    return ConversationDataset(path, world["images"], proc, cache=False)


@pytest.mark.parametrize(
    "how,layout,form",
    [
        ("feature", "conversations", "saved"),
        ("bytes", "messages", "parquet"),
        ("path", "conversations", "parquet-dir"),
        ("feature", "messages", "arrow"),
        ("path", "messages", "saved-dict"),
        ("feature-path", "messages", "pyarrow"),
    ],
)
def test_samples_equal_the_llava_json_ones(records, world, proc, reference, tmp_path, how, layout, form):
    ds = build(records, world["images"], how if how != "feature-path" else "feature", layout)
    root = world["images"] if how.endswith("path") else ""
    if form == "saved":
        ds.save_to_disk(tmp_path / "saved")
        kw = {"path": str(tmp_path / "saved")}
    elif form == "saved-dict":
        datasets.DatasetDict({"train": ds.select(range(3)), "val": ds}).save_to_disk(tmp_path / "dict")
        kw = {"path": str(tmp_path / "dict"), "split": "val"}
    elif form.startswith("parquet"):  # two files, read through a glob or their folder
        (tmp_path / "pq").mkdir()
        ds.select(range(5)).to_parquet(tmp_path / "pq" / "part-0.parquet")
        ds.select(range(5, len(ds))).to_parquet(tmp_path / "pq" / "part-1.parquet")
        kw = {"path": str(tmp_path / "pq" / ("part-*.parquet" if form == "parquet" else ""))}
    elif form == "pyarrow":  # Image cells that hold a path only (datasets' own writers embed the bytes)
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [
            {
                "id": r["id"],
                "images": [{"bytes": None, "path": n} for n in record_images(r)],
                layout: as_messages(r["conversations"]),
            }
            for r in records
        ]
        pq.write_table(pa.Table.from_pylist(rows, schema=ds.features.arrow_schema), tmp_path / "paths.parquet")
        kw = {"path": str(tmp_path / "paths.parquet")}
    else:
        ds.save_to_disk(tmp_path / "saved", max_shard_size=20_000)
        kw = {"path": str(tmp_path / "saved" / "*.arrow")}
    hf = dataset(proc, image_root=root, **{layout: layout}, **kw)
    assert type(hf.store.store.table).__name__ in ("MemoryMappedTable", "ConcatenationTable")  # mapped, not read
    assert_same_samples(hf, reference)
    again = pickle.loads(pickle.dumps(hf.store))  # as DataLoader workers get it
    assert again.load(len(records) - 3) == hf.store.load(len(records) - 3)


def test_one_image_per_row_column(records, world, proc, reference, tmp_path):
    recs = [r for r in records if len(record_images(r)) <= 1]
    build(recs, world["images"], "feature", "conversations", listed=False).save_to_disk(tmp_path / "one")
    hf = dataset(proc, path=str(tmp_path / "one"), conversations="conversations")
    keep = [i for i, r in enumerate(records) if len(record_images(r)) <= 1]
    for j, i in enumerate(keep):
        assert hf[j]["input_ids"] == reference[i]["input_ids"]
        assert torch.equal(hf[j]["pixel_values"], reference[i]["pixel_values"])


def test_bad_input_is_named_or_counted(records, world, proc, tmp_path):
    recs = [dict(r) for r in records[:4]]
    ds = build(recs, world["images"], "bytes", "messages").to_dict()
    ds["images"][1] = [b"not an image at all"]
    ds["messages"][2][0]["role"] = "robot"  # a turn of the wrong shape
    ds["messages"][3] = ds["messages"][3][:1]  # no answer turn
    bad = datasets.Dataset.from_dict(ds, features=build(recs, world["images"], "bytes", "messages").features)
    bad.save_to_disk(tmp_path / "bad")
    path = str(tmp_path / "bad")
    with pytest.raises(DataError, match=r"no column 'dialog'.*\['id', 'images', 'messages'\]") as e:
        HFRecords(path, messages="dialog")
    assert path in str(e.value)
    with pytest.raises(DataError, match=r"no split 'test'; the dataset has \['train'\]"):
        datasets.DatasetDict({"train": bad}).save_to_disk(tmp_path / "dict")
        HFRecords(str(tmp_path / "dict"), messages="messages", split="test")
    with pytest.raises(DataError, match=r"no saved dataset, \.parquet or \.arrow files found"):
        HFRecords(str(tmp_path / "nothing-*.parquet"), messages="messages")
    with pytest.raises(DataError, match=rf"{re.escape(path)}: row 2 \(id {recs[2]['id']}\): messages: \[0\] must be"):
        dataset(proc, path=path, messages="messages")
    lenient = dataset(proc, skip=True, path=path, messages="messages")
    assert len(lenient) == 2 and lenient.skipped == Counter({"bad turn": 1, "no answer turn": 1})
    bad.select([0, 1]).save_to_disk(tmp_path / "image")  # rows whose text is good: the image fails when read
    path = str(tmp_path / "image")
    want = rf"{re.escape(path)}: row 1 \(id \w+\): cannot load image 'images\[0\]': not a recognised image"
    with pytest.raises(DataError, match=want):
        dataset(proc, path=path, messages="messages")[1]
    batch = Collator(proc)([lenient[0], lenient[1]])
    assert batch["ids"] == [recs[0]["id"]] and batch["skipped"] == Counter({"unreadable image": 1})


def test_recipe_schema(tiny_lm_dir, tiny_clip_dir, world):
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    for source, message in [
        ({"hf_dataset": "x"}, "either conversations"),
        ({"hf_dataset": "x", "messages": "m", "json": "a.json"}, "excludes json"),
        ({"json": "a.json", "messages": "m"}, "only for hf_dataset"),
    ]:
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict({**data, "sources": {"s": source}})


@pytest.fixture
def hf_recipe(records, world, tiny_lm_dir, tiny_clip_dir, tmp_path):
    """A one-stage recipe on the records as parquet (messages, image bytes) mixed with a world source, packed."""
    build(records, world["images"], "bytes", "messages").to_parquet(tmp_path / "train.parquet")
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["sources"] = {
        "hf": {"hf_dataset": str(tmp_path / "train.parquet"), "images": "images", "messages": "messages"}
    }
    data["stages"] = [
        {
            "name": "hf",
            "data": {"hf": 2.0, "world/train/caption": 1.0},
            "train": {"bridge": "full"},
            "lr": {"bridge": 1e-2},
            "steps": 5,
            "batch_size": 2,
            "pack": True,
        }
    ]
    return data


def losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_packed_mixed_stage_trains_and_resumes_in_place(hf_recipe, tmp_path):
    from mmbridge.train.trainer import Trainer
    from tests.conftest import interrupted_run

    hf_recipe["save_every"] = 2
    recipe = recipe_from_dict(hf_recipe)
    Trainer(recipe, tmp_path / "a", progress=False).run()
    reference = losses(tmp_path / "a")
    assert len(reference) == 5 and all(v > 0 for v in reference)
    interrupted_run(recipe, tmp_path / "b", 4)  # during step 4; step 3 was logged after the step-2 checkpoint
    Trainer(recipe, tmp_path / "b", resume=True, progress=False).run()
    assert losses(tmp_path / "b") == pytest.approx(reference, rel=1e-6, abs=1e-7)
