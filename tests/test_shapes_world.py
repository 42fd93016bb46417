"""Tests for the synthetic shapes-world dataset generator."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from mmbridge.data import shapes_world as sw

SMALL = dict(n_train=12, n_val=4, n_test=4, seed=0, image_size=128)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("world")
    return root, sw.write_world(root, **SMALL)


def _scene(size: int, *specs: tuple[str, str, tuple[int, int, int, int]]) -> sw.Scene:
    objs = tuple(sw.make_object(s, c, b, size) for s, c, b in specs)
    return sw.Scene(size, (238, 238, 238), objs, None)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _all_records(manifest: dict):
    for split, tasks in manifest.items():
        for task, path in tasks.items():
            if task != "interleaved":
                for rec in json.loads(Path(path).read_text()):
                    yield split, task, rec


# ------------------------------------------------------------------ determinism / splits
def test_determinism_same_and_different_seed(tmp_path):
    a = sw.write_world(tmp_path / "a", **SMALL)
    sw.write_world(tmp_path / "b", **SMALL)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa == fb and any(k.endswith(".png") for k in fa)
    sw.write_world(tmp_path / "c", **{**SMALL, "seed": 1})
    fc = _files(tmp_path / "c")
    assert fc["train/caption.json"] != fa["train/caption.json"]
    assert fc["images/train/train_00000.png"] != fa["images/train/train_00000.png"]
    assert set(a) == set(sw.SPLITS)


def test_splits_disjoint(world):
    root, _ = world
    scenes = {s: sw.split_scenes(0, s, 50, 128) for s in sw.SPLITS}
    keys = {s: {sc.key() for sc in v} for s, v in scenes.items()}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"])
    assert not (keys["val"] & keys["test"])
    hashes = {
        s: {hashlib.sha1(p.read_bytes()).hexdigest() for p in (root / "images" / s).glob("*.png")} for s in sw.SPLITS
    }
    assert len(hashes["train"]) == SMALL["n_train"]
    assert not (hashes["train"] & hashes["val"]) and not (hashes["val"] & hashes["test"])
    with pytest.raises(RuntimeError):  # the guard itself works
        sw._check_disjoint({"train": scenes["train"][:3], "val": scenes["train"][2:4]})


# ------------------------------------------------------------------ scenes and pixels
def test_scene_constraints():
    rng = np.random.default_rng(1)
    counts = set()
    lo, hi = sw.size_bounds(256)
    for _ in range(300):
        sc = sw.sample_scene(rng, 256)
        counts.add(len(sc.objects))
        assert len({o.shape for o in sc.objects}) == len(sc.objects)
        assert len({o.colour for o in sc.objects}) == len(sc.objects)
        for i, o in enumerate(sc.objects):
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256 and lo <= x1 - x0 <= hi
            for p in sc.objects[i + 1 :]:
                assert sw._overlaps(o.box, p.box, 0) is False
    assert counts == {1, 2, 3}


def test_boxes_match_rendered_pixels():
    rng = np.random.default_rng(2)
    for _ in range(40):
        sc = sw.sample_scene(rng, 256, noise_prob=0.5)
        img = np.asarray(sw.render(sc)).astype(int)
        outside = np.ones(img.shape[:2], bool)
        for o in sc.objects:
            norm = sw.box_to_norm(o.box, 256)
            assert all(0 <= v <= 999 for v in norm) and norm[0] < norm[2] and norm[1] < norm[3]
            colour = np.array(sw.COLOURS[o.colour])
            cx, cy = (int(v) for v in o.centre)
            assert (img[cy - 2 : cy + 3, cx - 2 : cx + 3] == colour).all()
            ys, xs = np.nonzero((img == colour).all(-1))
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.box  # tight box
            x0, y0, x1, y1 = o.box
            outside[y0:y1, x0:x1] = False
        assert (np.abs(img[outside] - np.array(sc.background)) <= sw.NOISE_AMP).all()


def test_box_text_format():
    assert sw.box_to_text((10, 20, 100, 256), 256) == "[39, 78, 390, 999]"
    assert re.fullmatch(r"\[\d+, \d+, \d+, \d+\]", sw.box_to_text((0.0, 5.5, 30, 40), 64))


def test_position_and_size_words():
    sc = _scene(
        300,
        ("circle", "red", (10, 10, 90, 90)),
        ("square", "blue", (110, 110, 190, 190)),
        ("triangle", "green", (200, 110, 290, 200)),
    )
    assert [o.position for o in sc.objects] == ["top left", "center", "middle right"]
    assert sw.position_word((110, 210, 190, 290), 300) == "bottom center"
    assert sw.position_word((200, 0, 300, 60), 300) == "top right"
    assert sw.position_word((0, 220, 60, 300), 300) == "bottom left"
    assert [o.size_word for o in sc.objects] == ["small", "small", "medium"]
    assert sw.size_word(120, 300) == "large"


# ------------------------------------------------------------------ text
def test_caption_grammar():
    one = _scene(300, ("circle", "red", (10, 10, 90, 90)))
    two = _scene(300, ("square", "blue", (200, 200, 290, 290)), ("circle", "red", (10, 10, 90, 90)))
    three = _scene(
        300,
        ("triangle", "orange", (200, 10, 290, 100)),
        ("circle", "red", (10, 10, 90, 90)),
        ("square", "blue", (110, 150, 190, 230)),
    )
    assert sw.short_captions(one)[0] == "a red circle."
    assert sw.short_captions(two) == [
        "a red circle and a blue square.",
        "an image of a red circle and a blue square.",
        "a red circle and a blue square on a plain background.",
        "a picture showing a red circle and a blue square.",
        "there is a red circle and a blue square.",
    ]
    assert sw.short_captions(three)[1] == "an image of a red circle, a blue square and an orange triangle."
    assert sw.detailed_caption(one) == "There is one shape. A small red circle is at the top left."
    assert sw.detailed_caption(three) == (
        "There are three shapes. A small red circle is at the top left. A small blue square is at the "
        "center. A medium orange triangle is at the top right."
    )


def test_vqa_hand_scene():
    sc = _scene(300, ("square", "blue", (200, 200, 290, 290)), ("circle", "red", (10, 10, 90, 90)))
    absent_kinds = set()
    for seed in range(30):
        pairs = sw.vqa_pairs(sc, np.random.default_rng(seed))
        qa = {p["question"]: p["answer"] for p in pairs}
        assert qa["How many shapes are there?"] == "2"
        assert qa["What colour is the circle?"] == "red" and qa["What colour is the square?"] == "blue"
        assert qa["What shape is the red object?"] == "circle" and qa["What shape is the blue object?"] == "square"
        assert qa["Where is the red circle?"] == "top left" and qa["Where is the blue square?"] == "bottom right"
        assert qa["Is there a red circle?"] == "yes" and qa["Is there a blue square?"] == "yes"
        no = [p["question"] for p in pairs if p["answer"] == "no"]
        assert len(no) == 2 and all(p["qtype"] == "exists" for p in pairs if p["answer"] in ("yes", "no"))
        for q in no:
            colour, shape = re.fullmatch(r"Is there an? (\w+) (\w+)\?", q).groups()
            assert (colour, shape) not in {("red", "circle"), ("blue", "square")}
            absent_kinds.add((colour in ("red", "blue"), shape in ("circle", "square")))
        assert {p["qtype"] for p in pairs} == {"count", "colour", "shape", "position", "exists"}
    assert {(True, True), (True, False), (False, True)} <= absent_kinds


def test_yes_no_balanced(world):
    rng = np.random.default_rng(3)
    answers = [
        p["answer"] for _ in range(200) for p in sw.vqa_pairs(sw.sample_scene(rng), rng) if p["qtype"] == "exists"
    ]
    assert abs(answers.count("yes") / len(answers) - 0.5) < 0.05
    _, manifest = world
    val = json.loads(Path(manifest["val"]["vqa"]).read_text())
    yn = [r["answer"] for r in val if r["qtype"] == "exists"]
    assert yn.count("yes") == yn.count("no") > 0


def test_referring_unique_and_boxes():
    rng = np.random.default_rng(4)
    for _ in range(50):
        sc = sw.sample_scene(rng)
        refs = sw.referring(sc, rng)
        assert len(refs) == len(sc.objects)
        for r, o in zip(refs, sc.ordered()):
            assert r["expression"] in (f"the {o.colour} {o.shape}", f"the {o.shape}", f"the {o.colour} object")
            assert r["box"] == sw.box_to_norm(o.box, 256) and r["box_text"] == sw.box_to_text(o.box, 256)


# ------------------------------------------------------------------ written files
def _train_questions(manifest: dict) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for rec in json.loads(Path(manifest["train"]["vqa"]).read_text()):
        conv = rec["conversations"]
        out.setdefault(rec["image"], []).append(
            [(q["value"].replace("<image>\n", ""), a["value"]) for q, a in zip(conv[::2], conv[1::2])]
        )
    return out


@pytest.mark.parametrize("turns", [1, 4])
def test_train_vqa_chunks_keep_every_question(tmp_path, turns):
    """Each image's questions are split into conversations of `vqa_turns`; none is dropped."""
    manifest = sw.write_world(tmp_path, **{**SMALL, "vqa_turns": turns})
    convs = _train_questions(manifest)
    scenes = sw.split_scenes(SMALL["seed"], "train", SMALL["n_train"], SMALL["image_size"])
    assert len(convs) == len(scenes)
    for i, scene in enumerate(scenes):
        chunks = convs[f"train/train_{i:05d}.png"]
        n = 1 + 5 * len(scene.objects)  # count; colour, shape, position, "yes" and one "no" per object
        assert [len(c) for c in chunks] == [turns] * (n // turns) + ([n % turns] if n % turns else [])
        asked = [q for c in chunks for q, _ in c]
        assert len(set(asked)) == n and "How many shapes are there?" in asked
        assert dict(qa for c in chunks for qa in c)["How many shapes are there?"] == str(len(scene.objects))


def test_train_vqa_by_type_holds_one_type_per_conversation(tmp_path):
    manifest = sw.write_world(tmp_path, **{**SMALL, "vqa_turns": "type"})
    recs = json.loads(Path(manifest["train"]["vqa"]).read_text())
    convs = _train_questions(manifest)
    scenes = sw.split_scenes(SMALL["seed"], "train", SMALL["n_train"], SMALL["image_size"])
    kinds = {"How": "count", "What colour": "colour", "What shape": "shape", "Where": "position", "Is there": "exists"}

    def kind(q: str) -> str:
        return next(v for k, v in kinds.items() if q.startswith(k))

    for i, scene in enumerate(scenes):
        chunks = convs[f"train/train_{i:05d}.png"]
        n = len(scene.objects)
        assert sorted(len(c) for c in chunks) == sorted([1, n, n, n, 2 * n])
        assert all(len({kind(q) for q, _ in c}) == 1 for c in chunks)
        assert len({kind(c[0][0]) for c in chunks}) == 5
    assert len(recs) == 5 * len(scenes)
    with pytest.raises(ValueError, match="vqa_turns"):
        sw.write_world(tmp_path / "bad", **{**SMALL, "vqa_turns": 0})


def test_records_llava_format(world):
    root, manifest = world
    assert set(manifest["train"]) == {"caption", "detailed", "vqa", "grounding", "mixed", "multitask", "interleaved"}
    assert "mixed" not in manifest["val"]
    seen = set()
    for split, task, rec in _all_records(manifest):
        seen.add((split, task))
        conv = rec["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and conv
        assert sum(t["value"].count("<image>") for t in conv) == 1
        assert conv[0]["value"].startswith("<image>\n")
        assert rec["image"].startswith(f"{split}/") and (root / "images" / rec["image"]).is_file()
        if split == "train" and task == "vqa":
            assert len(conv) == 2  # one question per conversation by default (see the next test)
        if split != "train":
            assert len(conv) == 2
            if task == "caption":
                assert conv[1]["value"] == rec["references"][0] and len(rec["references"]) == 5
                assert conv[0]["value"] == "<image>\nDescribe the image briefly."
            if task == "vqa":
                assert rec["answer"] == conv[1]["value"] and rec["qtype"]
            if task == "grounding":
                assert conv[1]["value"] == "[" + ", ".join(map(str, rec["box"])) + "]"
                assert conv[0]["value"] == f"<image>\nGive the bounding box of {rec['expression']}."
                assert all(isinstance(v, int) and 0 <= v <= 999 for v in rec["box"])
    assert len(seen) == 6 + 4 + 4
    detailed = json.loads(Path(manifest["train"]["detailed"]).read_text())
    assert len(detailed) == SMALL["n_train"]


def test_manifest_idempotent(tmp_path):
    m1 = sw.write_world(tmp_path, **SMALL)
    paths = [tmp_path / "manifest.json", Path(m1["train"]["caption"]), tmp_path / "images/val/val_00000.png"]
    before = [p.stat().st_mtime_ns for p in paths]
    time.sleep(0.02)
    assert sw.write_world(tmp_path, **SMALL) == m1
    assert [p.stat().st_mtime_ns for p in paths] == before
    sw.write_world(tmp_path, **{**SMALL, "seed": 5})
    assert sw.load_manifest(tmp_path)["params"]["seed"] == 5
    assert paths[0].stat().st_mtime_ns != before[0]


def test_interleaved_schema(tmp_path):
    manifest = sw.write_world(tmp_path, **{**SMALL, "n_train": 30})
    lines = Path(manifest["train"]["interleaved"]).read_text().splitlines()
    assert len(lines) == 30 // 3
    sims = []
    for line in lines:
        doc = json.loads(line)
        texts, info = doc["text_list"], doc["image_info"]
        assert all(isinstance(t, str) and t for t in texts) and 2 <= len(info) <= 4
        assert len(texts) - len(info) in (1, 2)
        assert len({i["matched_text_index"] for i in info}) == len(info)
        for i in info:
            assert (tmp_path / "images" / i["image_name"]).is_file() and i["image_name"].startswith("train/")
            assert texts[i["matched_text_index"]].startswith("This picture shows")
            assert 0.15 <= i["matched_sim"] <= 0.35
            sims.append(i["matched_sim"])
    assert any(s < 0.2 for s in sims) and any(s >= 0.2 for s in sims)


# ------------------------------------------------------------------ the high-resolution option
# sha256 over every written file (relative path, then bytes) of write_world(**SMALL), taken before `shape_px` existed
DEFAULT_WORLD_SHA256 = "f8dfef13ffc2801977a14f4bac4136ef12adc9c9dca66d9211366c342a37b541"


def _tree_sha256(root: Path) -> str:
    h = hashlib.sha256()
    for name, data in _files(root).items():
        h.update(name.encode())
        h.update(data)
    return h.hexdigest()


def test_default_world_is_byte_for_byte_unchanged(tmp_path):
    sw.write_world(tmp_path / "a", **SMALL)
    sw.write_world(tmp_path / "b", **SMALL, shape_px=None)
    assert _tree_sha256(tmp_path / "a") == _tree_sha256(tmp_path / "b") == DEFAULT_WORLD_SHA256
    assert "shape_px" not in sw.load_manifest(tmp_path / "a")["params"]


def test_high_resolution_world_has_the_requested_sizes(tmp_path):
    from PIL import Image

    manifest = sw.write_world(tmp_path, n_train=6, n_val=2, n_test=4, seed=0, image_size=1024, shape_px=[20, 60])
    assert sw.load_manifest(tmp_path)["params"]["shape_px"] == [20, 60]
    for split, n in (("train", 6), ("test", 4)):
        paths = sorted((tmp_path / "images" / split).glob("*.png"))
        assert len(paths) == n and all(Image.open(p).size == (1024, 1024) for p in paths)
    sides = [
        o.box[2] - o.box[0]
        for s in sw.SPLITS
        for sc in sw.split_scenes(0, s, 40, 1024, 0.5, (20, 60))
        for o in sc.objects
    ]
    assert min(sides) >= 20 and max(sides) <= 60 and max(sides) - min(sides) > 30
    # the boxes written are the pixel boxes in [0, 999]: a 20-60 px shape spans 19-59 units
    for rec in json.loads(Path(manifest["test"]["grounding"]).read_text()):
        x0, y0, x1, y1 = rec["box"]
        assert 18 <= x1 - x0 <= 60 and abs((x1 - x0) - (y1 - y0)) <= 1  # square, up to truncation
    # size words follow the pixel range's terciles
    assert [sw.size_word(s, 1024, (20, 60)) for s in (20, 35, 45, 50)] == ["small", "medium", "medium", "large"]
    # a rendered shape covers its box: its colour is at the box centre
    scene = sw.split_scenes(0, "test", 1, 1024, 0.5, (20, 60))[0]
    img = np.asarray(Image.open(tmp_path / "images" / "test" / "test_00000.png"))
    for o in scene.objects:
        cx, cy = (o.box[0] + o.box[2]) // 2, (o.box[1] + o.box[3]) // 2
        assert tuple(img[cy, cx]) == sw.COLOURS[o.colour]


@pytest.mark.parametrize("bad", [[60, 20], [0, 10], [20, 600], [20], "20-60", [20.0, 60.0]])
def test_shape_px_is_checked(tmp_path, bad):
    with pytest.raises(ValueError, match="shape_px"):
        sw.write_world(tmp_path, n_train=1, n_val=1, n_test=1, image_size=1024, shape_px=bad)


def test_a_recipe_world_passes_shape_px(tmp_path):
    from mmbridge.config import RecipeError
    from mmbridge.data.sources import world_manifest

    _, images = world_manifest(
        {"root": str(tmp_path / "w"), "n_train": 2, "n_val": 1, "n_test": 1, "image_size": 512, "shape_px": [20, 40]}
    )
    assert sw.load_manifest(images.parent)["params"]["shape_px"] == [20, 40]
    with pytest.raises(RecipeError, match="shape_px"):
        world_manifest({"root": str(tmp_path / "x"), "n_train": 1, "n_val": 1, "n_test": 1, "shape_px": [5, 1]})


def test_worlds_of_other_parameters_live_beside_each_other_and_are_never_rewritten(tmp_path):
    """Two recipes on one world root (the demo's `vqa_turns: type` and another's default): each gets its own
    folder, and making the second leaves every file of the first as it was (runs of both can read at once)."""
    from mmbridge.data.sources import world_manifest

    base = {"root": str(tmp_path), "n_train": 4, "n_val": 2, "n_test": 2, "image_size": 32}
    first, images = world_manifest(base)
    files = sorted(p for p in images.parent.rglob("*") if p.is_file())
    stamp = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    second, other = world_manifest({**base, "vqa_turns": "type"})
    assert other.parent != images.parent and other.parent.parent == images.parent.parent == tmp_path
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == stamp
    assert sw.load_manifest(images.parent)["params"]["vqa_turns"] == 1
    assert sw.load_manifest(other.parent)["params"]["vqa_turns"] == "type"
    assert world_manifest(base) == (first, images)  # found again, not made again
    assert {p: p.stat().st_mtime_ns for p in files} == {p: m for p, (m, _) in stamp.items()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no private folder left behind


def test_a_world_published_by_another_process_first_is_kept(tmp_path):
    from mmbridge.data.sources import publish_world, world_folder

    cfg = {"n_train": 2, "n_val": 1, "n_test": 1, "seed": 0, "image_size": 32}
    folder = world_folder(tmp_path, cfg)
    publish_world(folder, cfg)
    manifest = folder / "manifest.json"
    before = manifest.stat().st_mtime_ns
    publish_world(folder, cfg)  # the second publisher finds the folder taken: its copy is dropped
    assert manifest.stat().st_mtime_ns == before
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_mmbridge_world_lists_a_recipes_world(tmp_path, capsys):
    from mmbridge.cli import main

    sets = [f"world.root={tmp_path}", "world.n_train=2", "world.n_val=1", "world.n_test=1", "world.image_size=32"]
    main(["world", "demo", *sum((["--set", s] for s in sets), [])])
    out = capsys.readouterr().out.splitlines()
    images = Path(out[0].removeprefix("images: "))
    assert images.is_dir() and images.parent.parent == tmp_path
    paths = dict(line.split(": ", 1) for line in out[1:])
    assert (
        Path(paths["world/test/vqa"]).is_file() and Path(paths["world/train/multitask"]).parent.parent == images.parent
    )
