"""Short videos for the shapes world: a shape moving across the frames, or shapes appearing one after another.

Each video is a folder of PNG frames written at `fps` frames per second, and asks one question:
`motion` ("Which way does the red circle move?" → left / right / up / down; one shape moves in a
straight line, another may stand still behind it) or `order` ("Which shape appears first?" → its
shape; two or three still shapes appear at different frames, the first in frame 0). Answers are
balanced: the direction and the moving or first shape are drawn uniformly. Records are LLaVA
conversations with a `video` frame list and its `fps` (`data/video.py`), under `video/<split>.json`;
frames under `images/video/<split>/`, beside the image world's, so one image root serves both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mmbridge.data.shapes_world import (
    BG_BASE,
    BG_TINT,
    COLOURS,
    SHAPES,
    SPLITS,
    Scene,
    _place_boxes,
    _split_rng,
    make_object,
    render,
)

VIDEO_VERSION = 1
DIRECTIONS = ("left", "right", "up", "down")
# the first entry of each question type is the evaluation prompt; all are used in training
QUESTIONS = {
    "motion": (
        "Which way does the {colour} {shape} move?",
        "In which direction is the {colour} {shape} moving?",
        "Does the {colour} {shape} move left, right, up or down?",
    ),
    "order": ("Which shape appears first?", "Which shape is shown first?", "What is the first shape to appear?"),
}
DEFAULTS = {"n_train": 1000, "n_val": 50, "n_test": 200, "frames": 8, "image_size": 96, "fps": 4}


def _pick(rng: np.random.Generator, options, k: int) -> list:
    return [options[i] for i in rng.choice(len(options), k, replace=False)]


def motion_video(rng: np.random.Generator, frames: int, size: int) -> tuple[list[Scene], dict]:
    """One shape moving left, right, up or down (a straight line, evenly per frame), maybe a still one behind."""
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    shapes, colours = _pick(rng, SHAPES, 2), _pick(rng, list(COLOURS), 2)
    side = int(rng.integers(round(0.2 * size), round(0.3 * size) + 1))
    room = size - side
    travel = int(rng.integers(round(0.45 * room), round(0.8 * room) + 1))
    start, across = int(rng.integers(0, room - travel + 1)), int(rng.integers(0, room + 1))
    sign = 1 if direction in ("right", "down") else -1
    first = start if sign > 0 else start + travel
    still = []
    if rng.random() < 0.5:  # a still shape, drawn first so the moving one is never hidden
        (box,) = _place_boxes(rng, 1, size)
        still = [make_object(shapes[1], colours[1], box, size)]
    background = tuple(int(BG_BASE + t) for t in rng.integers(-BG_TINT, BG_TINT + 1, 3))
    scenes = []
    for f in range(frames):
        along = first + sign * round(travel * f / (frames - 1))
        x, y = (along, across) if direction in ("left", "right") else (across, along)
        mover = make_object(shapes[0], colours[0], (x, y, x + side, y + side), size)
        scenes.append(Scene(size, background, tuple(still + [mover])))  # type: ignore[arg-type]
    question = {"qtype": "motion", "answer": direction, "colour": colours[0], "shape": shapes[0]}
    return scenes, question


def order_video(rng: np.random.Generator, frames: int, size: int) -> tuple[list[Scene], dict]:
    """Two or three still shapes, the first shown from frame 0, each other from its own later frame."""
    n = int(rng.integers(2, 4))
    shapes, colours = _pick(rng, SHAPES, n), _pick(rng, list(COLOURS), n)
    boxes = _place_boxes(rng, n, size)
    appear = [0] + sorted(int(f) for f in rng.choice(np.arange(1, frames - 1), n - 1, replace=False))
    objects = [make_object(s, c, b, size) for s, c, b in zip(shapes, colours, boxes)]
    background = tuple(int(BG_BASE + t) for t in rng.integers(-BG_TINT, BG_TINT + 1, 3))
    scenes = [
        Scene(size, background, tuple(o for o, a in zip(objects, appear) if a <= f))  # type: ignore[arg-type]
        for f in range(frames)
    ]
    return scenes, {"qtype": "order", "answer": shapes[0]}


def _record(split: str, idx: int, names: list[str], fps: float, question: dict, rng) -> dict[str, Any]:
    prompts = QUESTIONS[question["qtype"]]
    prompt = prompts[0] if split != "train" else prompts[int(rng.integers(len(prompts)))]
    text = prompt.format(colour=question.get("colour"), shape=question.get("shape"))
    return {
        "id": f"{split}_v{idx:05d}",
        "video": names,
        "fps": fps,
        "conversations": [{"from": "human", "value": f"<video>\n{text}"}, {"from": "gpt", "value": question["answer"]}],
        "qtype": question["qtype"],
        "answer": question["answer"],
    }


def _write_split(root: Path, split: str, n: int, seed: int, frames: int, size: int, fps: float) -> str:
    rng = _split_rng(seed, f"video/{split}", 0)
    records = []
    for i in range(n):
        scenes, question = (motion_video if i % 2 == 0 else order_video)(rng, frames, size)
        folder = Path("video") / split / f"{split}_v{i:05d}"
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        names = []
        for f, scene in enumerate(scenes):
            names.append(str(folder / f"f{f}.png"))
            render(scene).save(root / "images" / names[-1], format="PNG", compress_level=1)
        records.append(_record(split, i, names, fps, question, rng))
    rel = f"video/{split}.json"
    (root / "video").mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(json.dumps(records))
    return rel


def write_videos(root: str | os.PathLike, seed: int = 0, **options) -> dict[str, str]:
    """Write the videos under `root` (options: `DEFAULTS`); returns {split: path of its JSON}. Idempotent:
    nothing is rewritten when `root/video/manifest.json` records the same parameters and its files exist."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"world.videos: unknown key(s) {sorted(unknown)}; expected some of {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **options}
    if cfg["frames"] < 4 or cfg["image_size"] < 16 or not cfg["fps"] > 0:
        raise ValueError(f"world.videos: need frames >= 4, image_size >= 16 and fps > 0, got {cfg}")
    root = Path(root)
    params = {"version": VIDEO_VERSION, "seed": seed, **cfg}
    manifest = root / "video" / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
        files = {s: str(root / p) for s, p in old.get("splits", {}).items()}
        if old.get("params") == params and all(Path(p).exists() for p in files.values()):
            return files
    rel = {s: _write_split(root, s, cfg[f"n_{s}"], seed, cfg["frames"], cfg["image_size"], cfg["fps"]) for s in SPLITS}
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"params": params, "splits": rel}, indent=2))
    os.replace(tmp, manifest)
    return {s: str(root / p) for s, p in rel.items()}
