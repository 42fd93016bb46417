"""Paths a record or a command names stay where they belong (issue #29, the file half).

Media: a record's image, frame or video name is a regular file under its source's image root
(`data/media.py`), else a DataError naming the file, the record and the name, or with `bad_samples: skip` a
count of why; shard writers pack nothing from outside the root. Nothing here opens a FIFO or a device: a
FIFO used below is fed by a writer thread, so a reader that did open it would read an image and the test
would fail on what it read, never hang.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from mmbridge.data.dataset import Collator, ConversationDataset
from mmbridge.data.llava import DataError
from mmbridge.data.media import OUTSIDE, media_path
from tests.test_processor import make


def png(path: Path, colour=(200, 10, 10)) -> Path:
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def rec(i: int, **extra) -> dict:
    turns = [
        {"from": "human", "value": ("<video>\n" if "video" in extra else "<image>\n") + "what?"},
        {"from": "gpt", "value": "a shape"},
    ]
    return {"id": f"r{i}", "conversations": turns, **({"image": "good.png"} if not extra else extra)}


@contextmanager
def fed_fifo(path: Path, data: bytes):
    """A FIFO at `path` that hands `data` (less than a pipe's 64 KiB) to whoever opens it; on exit the writer
    is let go by a read end opened without blocking, and kept open until the writer is done."""
    os.mkfifo(path)

    def feed():
        with open(path, "wb") as f:  # blocks until someone opens the read end
            f.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        yield path
    finally:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(60)  # a safety net only: with a read end open, the writer's open and write return at once
        os.close(fd)
        assert not writer.is_alive()


@pytest.fixture
def tree(tmp_path):
    """root/ holding good.png, a symlink to it and one to outside.png beside root/ (the user's own layout)."""
    root = tmp_path / "root"
    root.mkdir()
    png(root / "good.png")
    (root / "sub").mkdir()
    (root / "sub" / "inner.png").symlink_to(root / "good.png")
    png(tmp_path / "outside.png", (0, 0, 250))
    (root / "escape.png").symlink_to(tmp_path / "outside.png")
    return root


BAD_NAMES = [
    "/etc/passwd",
    "../outside.png",
    "sub/../../outside.png",
    "/dev/zero",
    "http://h/x.png",
    "file:///etc/passwd",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_outside_the_image_root_is_named_or_counted(tokenizer, tree, name):
    path = tree / "data.json"
    path.write_text(json.dumps([rec(0), rec(1, image=name), rec(2, image="sub/inner.png"), rec(3, image="escape.png")]))
    proc = make(tokenizer, n=2)
    strict = ConversationDataset(path, tree, proc, cache=False)
    with pytest.raises(
        DataError,
        match=rf"data\.json: record 1 \(id r1\): .*{re.escape(name.split('/')[-1])}.*"
        r"(outside the image root|a URL is not a file)",
    ) as err:
        strict[1]
    assert err.value.kind == OUTSIDE
    assert strict[2]["pixel_values"].shape == (1, 3, 32, 32)  # the root's symlinks are followed, inside
    assert strict[3]["pixel_values"].shape == (1, 3, 32, 32)  # and out: the user placed them
    lenient = ConversationDataset(path, tree, proc, skip_bad=True, cache=False)
    batch = Collator(proc)([lenient[i] for i in range(4)])
    assert batch["ids"] == ["r0", "r2", "r3"] and batch["skipped"] == Counter({OUTSIDE: 1})


def test_a_fifo_or_a_folder_is_not_an_image_and_nothing_blocks(tokenizer, tree):
    with fed_fifo(tree / "pipe.png", (tree / "good.png").read_bytes()):
        for name, what in (("pipe.png", "a FIFO"), ("sub", "a folder")):
            with pytest.raises(Exception, match=f"not a regular file \\({what}\\)"):
                media_path(tree, name)
        path = tree / "data.json"
        path.write_text(json.dumps([rec(0), rec(1, image="pipe.png")]))
        proc = make(tokenizer, n=2)
        with pytest.raises(DataError, match=r"record 1 \(id r1\).*pipe\.png.*not a regular file"):
            ConversationDataset(path, tree, proc, cache=False)[1]
        lenient = ConversationDataset(path, tree, proc, skip_bad=True, cache=False)
        assert Collator(proc)([lenient[0], lenient[1]])["skipped"] == Counter({"unreadable image": 1})


def test_media_paths_are_absolute_files_under_the_root(tree, monkeypatch):
    assert media_path(tree, "sub/inner.png") == str(tree / "sub" / "inner.png")  # the symlink, followed by readers
    assert media_path(tree, "sub/../good.png") == str(tree / "good.png")
    assert media_path(tree, str(tree / "good.png")) == str(tree / "good.png")  # absolute, inside
    assert media_path(tree, "missing.png") == str(tree / "missing.png")  # the reader says "missing"
    monkeypatch.chdir(tree)
    assert media_path("", "good.png") == os.path.join(os.getcwd(), "good.png")  # no root: the working directory


@pytest.mark.parametrize(
    "name,says",
    [
        ("http://h/x.mp4", "a URL is not a file"),
        ("../clip.mp4", OUTSIDE),
        ("pipe.mp4", r"not a regular file \(a FIFO\)"),
    ],
)
def test_a_video_file_outside_the_root_or_not_a_file_never_reaches_ffmpeg(tokenizer, tmp_path, monkeypatch, name, says):
    """With no image root, `http://h/x.mp4` was handed to FFmpeg as `http:/h/x.mp4`, a URL."""
    pytest.importorskip("av")
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.chdir(root)  # no image root: the working directory is the root
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 64)
    path = root / "data.json"
    path.write_text(json.dumps([rec(0, video=["a.png", "b.png"]), rec(1, video=name)]))
    for frame in ("a.png", "b.png"):
        png(root / frame)
    proc = make(tokenizer, n=2)
    with fed_fifo(root / "pipe.mp4", b"\0" * 4096):
        with pytest.raises(DataError, match=rf"data\.json: record 1 \(id r1\): 'video': .*{says}") as err:
            ConversationDataset(path, "", proc, cache=False)
        assert err.value.kind == (OUTSIDE if name != "pipe.mp4" else "unreadable video")
        lenient = ConversationDataset(path, "", proc, skip_bad=True, cache=False)
        assert len(lenient) == 1 and lenient.skipped == Counter({err.value.kind: 1})


@pytest.mark.parametrize(
    "name,says",
    [
        ("/etc/passwd", OUTSIDE),
        ("../outside.png", OUTSIDE),
        ("/dev/zero", OUTSIDE),
        ("pipe.png", r"not a regular file \(a FIFO\)"),
    ],
)
def test_write_shards_packs_nothing_from_outside_the_root(tree, tmp_path, name, says):
    from mmbridge.data.shards import write_shards

    data = tree / "data.json"
    data.write_text(json.dumps([rec(0), rec(1, image="sub/inner.png"), rec(2, image=name)]))
    out = tmp_path / "shards"
    with fed_fifo(tree / "pipe.png", (tmp_path / "outside.png").read_bytes()):
        with pytest.raises(DataError, match=rf"data\.json: record 2 \(id r2\): image\[0\]: .*{says}"):
            write_shards(data, tree, out)
    assert not out.exists() or not list(out.iterdir())  # checked before anything was written
    data.write_text(json.dumps([rec(0), rec(1, image="sub/inner.png")]))
    (shard,) = write_shards(data, tree, out)
    with tarfile.open(shard) as t:
        members = {m.name: t.extractfile(m).read() for m in t if m.isfile()}
    assert members["s00000001.0.png"] == (tree / "good.png").read_bytes()


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.png", "pipe.png"])
def test_interleaved_documents_name_only_files_under_their_root(tree, tmp_path, name):
    from mmbridge.lcl.readers import LCLDataError, read_jsonl, write_shards

    def doc(image):
        return json.dumps(
            {
                "text_list": ["a red square"],
                "image_info": [{"image_name": image, "matched_text_index": 0, "matched_sim": 0.5}],
            }
        )

    jsonl = tree / "docs.jsonl"
    jsonl.write_text(doc("good.png") + "\n" + doc(name) + "\n")
    out = tmp_path / "shards"
    with fed_fifo(tree / "pipe.png", (tmp_path / "outside.png").read_bytes()):
        with pytest.raises(
            LCLDataError,
            match=r"docs\.jsonl:2: image_info\[0\]\.image_name: .*"
            r"(outside the image root|not a regular file)",
        ):
            read_jsonl(jsonl, tree)
        with pytest.raises(LCLDataError, match=r"docs\.jsonl:2: image_info\[0\]\.image_name"):
            write_shards(jsonl, tree, out)
    assert not out.exists() or not list(out.iterdir())


# -- run directories: nothing deleted or replaced that the same call did not create ------------------------
def checkpoint_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_runs_without_resume_keep_every_earlier_checkpoint_set(tiny_lm_dir, tiny_clip_dir, world, tmp_path, capsys):
    """A second run without --resume deleted the first run's `checkpoints.old` while saying it was 'moved'."""
    from mmbridge.config import recipe_from_dict
    from mmbridge.train import checkpoint as ckpt
    from mmbridge.train.trainer import Trainer
    from tests.conftest import tiny_recipe_dict

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"])
    data["stages"] = data["stages"][:1]
    data.update({"save_every": 1, "threads": 1})
    data["stages"][0]["steps"] = 2
    recipe, run = recipe_from_dict(data), tmp_path / "run"
    Trainer(recipe, run, progress=False).run()
    first = checkpoint_files(run / "checkpoints")
    Trainer(recipe, run, progress=False).run()
    second = checkpoint_files(run / "checkpoints")
    capsys.readouterr()
    Trainer(recipe, run, progress=False)  # a third run sets the second one's checkpoints aside as well
    said = capsys.readouterr().out
    kept = sorted(run.glob("checkpoints.old-*"))
    assert len(kept) == 2 and [checkpoint_files(k) for k in kept] == [first, second]  # by name: oldest first
    assert f"was moved, whole, to {kept[1]}" in said and "nothing was deleted" in said
    assert not list((run / "checkpoints").iterdir()) and not ckpt.list_checkpoints(run)


def test_checkpoint_cleanup_removes_only_its_own_leftovers(tmp_path):
    """The cleanup at a run's start deleted every hidden entry of RUN/checkpoints."""
    from mmbridge.train import checkpoint as ckpt

    root = tmp_path / "run" / "checkpoints"
    (root / "stage0-step0000002").mkdir(parents=True)
    mine = {
        ".notes": "a file",
        ".backup/keep.txt": "a folder",
        ".stage-notes/keep.txt": "a near miss",
        ".stage0-step0000001.tmp.txt": "a file named like a temp folder",
    }
    for name, text in mine.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    leftovers = [
        ".stage0-step0000003.tmp",
        ".stage0-step0000003.k2x_9abc.tmp",
        ".stage0-step0000001.deleting",
        ".stage0-step0000002.ab12cd34.old",
    ]
    for name in leftovers:
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"half")
    (root / ".stage0-step0000004.zz99yy88.old").mkdir()  # set aside, its replacement never written: put back
    (root / ".stage0-step0000004.zz99yy88.old" / "meta.json").write_text("{}")
    ckpt.remove_partial(tmp_path / "run")
    assert {name: (root / name).read_text() for name in mine} == mine
    assert not any((root / name).exists() for name in leftovers)
    assert (root / "stage0-step0000004" / "meta.json").read_text() == "{}"
    assert ckpt.set_aside(tmp_path / "other") is None
    (tmp_path / "other" / "checkpoints").mkdir(parents=True)
    (tmp_path / "other" / "checkpoints" / ".notes").write_text("mine")
    assert ckpt.set_aside(tmp_path / "other") is None  # no checkpoint of a run there: nothing moves
    assert (tmp_path / "other" / "checkpoints" / ".notes").read_text() == "mine"


def test_a_folder_write_never_touches_temp_or_old_names_it_did_not_make(tmp_path):
    """`model/` was written through `.model.tmp` and `.model.old`, deleting whatever had those names."""
    import torch

    from mmbridge.train.checkpoint import load_weights, save_weights

    run = tmp_path / "run"
    for name in (".model.tmp", ".model.old"):
        (run / name).mkdir(parents=True)
        (run / name / "keep.txt").write_text(name)
    layer = torch.nn.Linear(2, 2)
    for value in (1.0, 2.0):  # the second write replaces the first
        torch.nn.init.constant_(layer.weight, value)
        save_weights(layer, {"weight"}, run / "model", {"keys": ["weight"], "lora": None})
    assert sorted(p.name for p in run.iterdir()) == [".model.old", ".model.tmp", "model"]
    assert [(run / n / "keep.txt").read_text() for n in (".model.tmp", ".model.old")] == [".model.tmp", ".model.old"]
    torch.nn.init.zeros_(layer.weight)
    load_weights(layer, run / "model")
    assert torch.equal(layer.weight, torch.full((2, 2), 2.0))


def test_a_checkpoint_found_corrupt_again_keeps_the_earlier_corrupt_copy(tmp_path, capsys):
    """Setting a bad checkpoint aside deleted an earlier `NAME.corrupt` of the same name."""
    from mmbridge.train import checkpoint as ckpt

    root = tmp_path / "run" / "checkpoints"
    (root / "stage0-step0000004.corrupt").mkdir(parents=True)
    (root / "stage0-step0000004.corrupt" / "meta.json").write_text("first")
    (root / "stage0-step0000004").mkdir()
    (root / "stage0-step0000004" / "meta.json").write_text("second")  # no manifest: unusable
    assert ckpt.latest_checkpoint(tmp_path / "run", say=print) is None
    assert "moved to stage0-step0000004.corrupt2" in capsys.readouterr().out
    assert [(root / f"stage0-step0000004.{n}" / "meta.json").read_text() for n in ("corrupt", "corrupt2")] == [
        "first",
        "second",
    ]


def test_evaluation_reads_images_only_under_its_root(tree):
    from mmbridge.data.media import MediaPathError
    from mmbridge.eval.reliance import image_reliance

    records = [rec(0), rec(1, image="../outside.png")]
    with pytest.raises(MediaPathError, match=r"'\.\./outside\.png'.*outside the image root"):
        image_reliance(None, None, records, tree)  # refused before any model is used
