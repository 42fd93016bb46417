"""Shapes world: a deterministic, seeded synthetic multimodal dataset.

Scenes hold 1-3 flat coloured shapes on a light background. Every scene yields
short captions, a detailed caption, VQA pairs and referring expressions with
boxes; :func:`write_world` writes images plus LLaVA-format JSON (and MMC4-style
interleaved JSONL) for the train/val/test splits.

By default a shape's side is 18-45% of the image's. ``shape_px=(lo, hi)`` (opt-in) sets it in pixels
instead: with large images (``image_size=1024, shape_px=(20, 60)``) that is a high-resolution task,
whose shapes a single 256-px resize shrinks to 5-15 px. Without it the output is unchanged.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 3
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 205, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 10),
}
SPLITS: tuple[str, ...] = ("train", "val", "test")
MIN_FRAC, MAX_FRAC = 0.18, 0.45  # object side as a fraction of the image width
BG_BASE, BG_TINT, NOISE_AMP = 238, 14, 3
NUMBER_WORDS = ("zero", "one", "two", "three")
ROW_WORDS, COL_WORDS = ("top", "middle", "bottom"), ("left", "center", "right")
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{objs}.",
    "an image of {objs}.",
    "{objs} on a plain background.",
    "a picture showing {objs}.",
    "there is {objs}.",
)
# First entry of each task is the fixed evaluation prompt; all are used in training.
PROMPTS: dict[str, tuple[str, ...]] = {
    "caption": (
        "Describe the image briefly.",
        "Write a short caption for this image.",
        "Briefly describe the picture.",
        "Give a one-sentence description of the image.",
    ),
    "detailed": (
        "Describe the image in detail.",
        "Give a detailed description of this image.",
        "Describe every shape in the picture, including its size and position.",
    ),
    "grounding": (
        "Give the bounding box of {expr}.",
        "Where is {expr}? Answer with a bounding box.",
        "Output the bounding box of {expr}.",
    ),
}
FILLERS: tuple[str, ...] = (
    "Here is another picture.",
    "Take a look at this one.",
    "The next image is shown below.",
    "Shapes come in many colours.",
)
IMAGE_TOKEN = "<image>"

Box = tuple[int, int, int, int]
Bounds = tuple[int, int] | None  # (min, max) object side in pixels; None: MIN_FRAC/MAX_FRAC of the image


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape; ``box`` is the tight pixel box (x0, y0, x1, y1), x1/y1 exclusive."""

    shape: str
    colour: str
    box: Box
    size_word: str
    position: str

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class Scene:
    """A full scene: image size, background colour, optional noise seed and objects."""

    image_size: int
    background: tuple[int, int, int]
    objects: tuple[ShapeObject, ...]
    noise_seed: int | None = None

    def ordered(self) -> list[ShapeObject]:
        """Objects sorted left-to-right by box centre."""
        return sorted(self.objects, key=lambda o: o.centre[0])

    def key(self) -> tuple:
        """Hashable identity of the scene's generation parameters."""
        objs = tuple((o.shape, o.colour, tuple(o.box)) for o in self.objects)
        return (self.image_size, tuple(self.background), self.noise_seed, objs)


# ---------------------------------------------------------------- geometry / words
def box_to_norm(box: Sequence[float], image_size: int) -> list[int]:
    """Pixel box -> integer coordinates in [0, 999]."""
    return [min(999, max(0, int(c / image_size * 1000))) for c in box]


def box_to_text(box: Sequence[float], image_size: int) -> str:
    """Pixel box -> ``"[x0, y0, x1, y1]"`` with coordinates in [0, 999]."""
    return "[" + ", ".join(str(v) for v in box_to_norm(box, image_size)) + "]"


def size_bounds(image_size: int, shape_px: Bounds = None) -> tuple[int, int]:
    """Inclusive (min, max) object side length in pixels: ``shape_px`` if given, else fractions of the image."""
    if shape_px is not None:
        return int(shape_px[0]), int(shape_px[1])
    return round(MIN_FRAC * image_size), round(MAX_FRAC * image_size)


def check_shape_px(shape_px: Any, image_size: int) -> Bounds:
    """``shape_px`` as an (lo, hi) tuple of ints, 1 <= lo < hi <= image_size / 2; None stays None."""
    if shape_px is None:
        return None
    if (
        not isinstance(shape_px, (list, tuple))
        or len(shape_px) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape_px)
    ):
        raise ValueError(f"world.shape_px: expected [min, max] object side in pixels, got {shape_px!r}")
    lo, hi = shape_px
    if not 1 <= lo < hi <= image_size // 2:
        raise ValueError(f"world.shape_px: need 1 <= min < max <= image_size / 2 = {image_size // 2}, got {shape_px!r}")
    return lo, hi


def size_word(side: float, image_size: int, shape_px: Bounds = None) -> str:
    """small/medium/large by terciles of the allowed side-length range."""
    lo, hi = size_bounds(image_size, shape_px)
    t = (side - lo) / (hi - lo)
    return "small" if t < 1 / 3 else "medium" if t < 2 / 3 else "large"


def position_word(box: Sequence[float], image_size: int) -> str:
    """Thirds grid word for the box centre, e.g. "top left"; the middle cell is "center"."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col = min(2, int(3 * cx / image_size))
    row = min(2, int(3 * cy / image_size))
    if row == 1 and col == 1:
        return "center"
    return f"{ROW_WORDS[row]} {COL_WORDS[col]}"


def make_object(shape: str, colour: str, box: Sequence[int], image_size: int, shape_px: Bounds = None) -> ShapeObject:
    """Build a ShapeObject, deriving its size and position words."""
    assert shape in SHAPES and colour in COLOURS, (shape, colour)
    b = tuple(int(v) for v in box)
    return ShapeObject(shape, colour, b, size_word(b[2] - b[0], image_size, shape_px), position_word(b, image_size))


# ---------------------------------------------------------------- sampling / rendering
def _overlaps(a: Box, b: Box, margin: int) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def _place_boxes(rng: np.random.Generator, n: int, image_size: int, shape_px: Bounds = None) -> list[Box]:
    """Rejection-sample ``n`` non-overlapping square boxes fully inside the image."""
    lo, hi = size_bounds(image_size, shape_px)
    margin = max(2, image_size // 50)
    while True:
        boxes: list[Box] = []
        for _ in range(n):
            for _try in range(50):
                side = int(rng.integers(lo, hi + 1))
                x0 = int(rng.integers(0, image_size - side + 1))
                y0 = int(rng.integers(0, image_size - side + 1))
                cand = (x0, y0, x0 + side, y0 + side)
                if not any(_overlaps(cand, b, margin) for b in boxes):
                    boxes.append(cand)
                    break
            else:
                break  # could not place this object: restart the scene
        if len(boxes) == n:
            return boxes


def sample_scene(
    rng: np.random.Generator, image_size: int = 256, noise_prob: float = 0.5, shape_px: Bounds = None
) -> Scene:
    """Sample a scene of 1-3 objects with distinct shapes and distinct colours (sides in ``shape_px`` if given)."""
    n = int(rng.integers(1, 4))
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), n, replace=False)]
    names = list(COLOURS)
    colours = [names[i] for i in rng.choice(len(names), n, replace=False)]
    boxes = _place_boxes(rng, n, image_size, shape_px)
    background = tuple(int(BG_BASE + t) for t in rng.integers(-BG_TINT, BG_TINT + 1, 3))
    noise_seed = int(rng.integers(0, 2**31 - 1)) if rng.random() < noise_prob else None
    objects = tuple(make_object(s, c, b, image_size, shape_px) for s, c, b in zip(shapes, colours, boxes))
    return Scene(image_size, background, objects, noise_seed)  # type: ignore[arg-type]


def _draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject) -> None:
    x0, y0, x1, y1 = obj.box
    r, b = x1 - 1, y1 - 1  # PIL coordinates are inclusive
    cx, cy = (x0 + r) / 2, (y0 + b) / 2
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([x0, y0, r, b], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, r, b], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (r, b), (x0, b)], fill=fill)
    else:
        draw.polygon([(cx, y0), (r, cy), (cx, b), (x0, cy)], fill=fill)


def render(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB PIL image (deterministic)."""
    s = scene.image_size
    if scene.noise_seed is None:
        img = Image.new("RGB", (s, s), tuple(scene.background))
    else:
        # faint luminance noise (same offset on all channels: cheap to PNG-encode)
        noise = np.random.default_rng(scene.noise_seed).integers(-NOISE_AMP, NOISE_AMP + 1, (s, s, 1), dtype=np.int16)
        arr = np.clip(np.asarray(scene.background, np.int16) + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_shape(draw, obj)
    return img


# ---------------------------------------------------------------- text
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: ShapeObject, with_size: bool = False) -> str:
    words = ([obj.size_word] if with_size else []) + [obj.colour, obj.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def short_captions(scene: Scene) -> list[str]:
    """All short caption paraphrases (objects left-to-right); first is the canonical one."""
    objs = _join([_phrase(o) for o in scene.ordered()])
    return [t.format(objs=objs) for t in CAPTION_TEMPLATES]


def detailed_caption(scene: Scene) -> str:
    """E.g. "There are two shapes. A large red circle is at the top left. ..."."""
    n = len(scene.objects)
    head = "There is one shape." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes."
    parts = [head] + [f"{_phrase(o, True).capitalize()} is at the {o.position}." for o in scene.ordered()]
    return " ".join(parts)


def scene_sentence(scene: Scene) -> str:
    """One descriptive sentence, used for interleaved documents."""
    objs = _join([f"{_phrase(o, True)} at the {o.position}" for o in scene.ordered()])
    return f"This picture shows {objs}."


def _absent_combos(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    """Absent (colour, shape) pairs grouped by which part is present in the scene."""
    present = {(o.colour, o.shape) for o in scene.objects}
    cols, shps = {o.colour for o in scene.objects}, {o.shape for o in scene.objects}
    cats: dict[str, list[tuple[str, str]]] = {"both": [], "colour": [], "shape": [], "neither": []}
    for c in COLOURS:
        for s in SHAPES:
            if (c, s) not in present:
                cat = (
                    "both"
                    if c in cols and s in shps
                    else "colour"
                    if c in cols
                    else "shape"
                    if s in shps
                    else "neither"
                )
                cats[cat].append((c, s))
    return cats


def _qa(question: str, answer: str, qtype: str) -> dict[str, str]:
    return {"question": question, "answer": answer, "qtype": qtype}


def vqa_pairs(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """Question/answer pairs (keys question, answer, qtype); yes/no are balanced per scene."""
    objs = scene.ordered()
    pairs = [_qa("How many shapes are there?", str(len(objs)), "count")]
    for o in objs:
        pairs.append(_qa(f"What colour is the {o.shape}?", o.colour, "colour"))
        pairs.append(_qa(f"What shape is the {o.colour} object?", o.shape, "shape"))
        pairs.append(_qa(f"Where is the {o.colour} {o.shape}?", o.position, "position"))
    exist = [_qa(f"Is there {_article(o.colour)} {o.colour} {o.shape}?", "yes", "exists") for o in objs]
    cats = _absent_combos(scene)
    for _ in range(len(objs)):
        names = [k for k, v in cats.items() if v]
        pool = cats[names[int(rng.integers(len(names)))]]
        c, s = pool.pop(int(rng.integers(len(pool))))
        exist.append(_qa(f"Is there {_article(c)} {c} {s}?", "no", "exists"))
    return pairs + [exist[i] for i in rng.permutation(len(exist))]


def referring(scene: Scene, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Per object (left-to-right): a unique referring expression and its box."""
    out = []
    for o in scene.ordered():
        u = rng.random()
        expr = f"the {o.colour} {o.shape}" if u < 0.6 else f"the {o.shape}" if u < 0.8 else f"the {o.colour} object"
        out.append(
            {
                "expression": expr,
                "box": box_to_norm(o.box, scene.image_size),
                "box_text": box_to_text(o.box, scene.image_size),
            }
        )
    return out


def instruction(task: str, rng: np.random.Generator | None = None, expr: str = "") -> str:
    """Prompt for a task: the fixed eval prompt if ``rng`` is None, else a random paraphrase."""
    options = PROMPTS[task]
    text = options[0] if rng is None else options[int(rng.integers(len(options)))]
    return text.format(expr=expr) if "{expr}" in text else text


# ---------------------------------------------------------------- records
def _conversation(turns: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """(prompt, answer) turns -> LLaVA conversation with one leading <image> token."""
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{q}" if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def _scene_records(
    split: str, idx: int, scene: Scene, rng: np.random.Generator, max_turns: int, vqa_turns: int | str
) -> dict[str, list[dict[str, Any]]]:
    """All task records for one image of a split.

    Training VQA conversations hold `vqa_turns` questions each, all of the image's questions over
    its records. More than one lets a question give away another's answer ("Where is the green
    triangle?" before "Is there a green triangle?"), and a model trained so learns to read answers off
    the conversation instead of the image: single-turn VQA at test time then falls to its priors.
    `vqa_turns: type` puts each question type in one conversation (all colour questions, all yes/no ones...):
    questions of one type do not answer each other, and the image's tokens are read once for all of them."""
    sid, image = f"{split}_{idx:05d}", f"{split}/{split}_{idx:05d}.png"
    caps, qas, refs = short_captions(scene), vqa_pairs(scene, rng), referring(scene, rng)
    det = detailed_caption(scene)

    def rec(rid: str, turns: Sequence[tuple[str, str]], **extra: Any) -> dict[str, Any]:
        return {"id": rid, "image": image, "conversations": _conversation(turns), **extra}

    def ground_turn(r: dict[str, Any], train: bool) -> tuple[str, str]:
        return instruction("grounding", rng if train else None, r["expression"]), r["box_text"]

    if split != "train":
        return {
            "caption": [rec(sid, [(instruction("caption"), caps[0])], references=caps)],
            "detailed": [rec(sid, [(instruction("detailed"), det)])],
            "vqa": [
                rec(f"{sid}_q{j}", [(q["question"], q["answer"])], qtype=q["qtype"], answer=q["answer"])
                for j, q in enumerate(qas)
            ],
            "grounding": [
                rec(f"{sid}_g{j}", [ground_turn(r, False)], box=r["box"], expression=r["expression"])
                for j, r in enumerate(refs)
            ],
        }
    cap_turn = (instruction("caption", rng), caps[int(rng.integers(len(caps)))])
    order = rng.permutation(len(qas))
    qa_turns = [(qas[j]["question"], qas[j]["answer"]) for j in order]
    ground_turns = [ground_turn(refs[j], True) for j in rng.permutation(len(refs))]
    extra = qa_turns[: int(rng.integers(1, 4))] + ground_turns[: int(rng.integers(1, min(2, len(refs)) + 1))]
    mixed = [cap_turn] + [extra[j] for j in rng.permutation(len(extra))]
    # every question and referring expression of the image in one conversation (the demo's stage 2)
    full = qa_turns[:max_turns] + ground_turns
    multitask = [cap_turn] + [full[j] for j in rng.permutation(len(full))]
    return {
        "caption": [rec(sid, [cap_turn])],
        "detailed": [rec(sid, [(instruction("detailed", rng), det)])],
        "vqa": [
            rec(f"{sid}_c{k}", chunk)
            for k, chunk in enumerate(_vqa_chunks(qa_turns, [qas[j] for j in order], vqa_turns))
        ],
        "grounding": [rec(sid, ground_turns)],
        "mixed": [rec(sid, mixed)],
        "multitask": [rec(sid, multitask)],
    }


def _interleaved_docs(split: str, scenes: Sequence[Scene], rng: np.random.Generator) -> list[dict[str, Any]]:
    """MMC4-style documents (text_list + image_info) reusing the split's images."""
    n = len(scenes)
    order, pos, docs = rng.permutation(max(n, 1)), 0, []
    for d in range(n // 3):
        k = min(n, int(rng.integers(2, 5)))
        idx = [int(order[(pos + j) % n]) for j in range(k)]
        pos += k
        n_fill = int(rng.integers(1, 3))
        items: list[tuple[int | None, str]] = [(i, scene_sentence(scenes[i])) for i in idx]
        items += [(None, FILLERS[int(rng.integers(len(FILLERS)))]) for _ in range(n_fill)]
        items = [items[j] for j in rng.permutation(len(items))]
        info = []
        for t, (i, _) in enumerate(items):
            if i is not None:
                sim = rng.uniform(0.15, 0.2) if rng.random() < 0.2 else rng.uniform(0.2, 0.35)
                info.append(
                    {
                        "image_name": f"{split}/{split}_{i:05d}.png",
                        "matched_text_index": t,
                        "matched_sim": round(float(sim), 4),
                    }
                )
        docs.append({"id": f"{split}_doc{d:05d}", "text_list": [s for _, s in items], "image_info": info})
    return docs


# ---------------------------------------------------------------- writing
def _split_rng(seed: int, split: str, stream: int) -> np.random.Generator:
    """Independent rng stream per (seed, split, purpose)."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), stream])


def split_scenes(
    seed: int, split: str, n: int, image_size: int = 256, noise_prob: float = 0.5, shape_px: Bounds = None
) -> list[Scene]:
    """The scenes that :func:`write_world` generates for ``split``."""
    rng = _split_rng(seed, split, 0)
    return [sample_scene(rng, image_size, noise_prob, shape_px) for _ in range(n)]


def _check_disjoint(scenes: dict[str, list[Scene]]) -> None:
    seen: dict[tuple, str] = {}
    for split, items in scenes.items():
        for sc in items:
            other = seen.setdefault(sc.key(), split)
            if other != split:
                raise RuntimeError(f"scene repeated across splits {other!r} and {split!r}")


def _vqa_chunks(turns: list, pairs: list[dict[str, str]], vqa_turns: int | str) -> list[list]:
    """Training VQA turns split into conversations: `vqa_turns` at a time, or one per question type ("type",
    types in the order they first come)."""
    if vqa_turns == "type":
        types = list(dict.fromkeys(p["qtype"] for p in pairs))
        return [[t for t, p in zip(turns, pairs) if p["qtype"] == kind] for kind in types]
    return [turns[j : j + vqa_turns] for j in range(0, len(turns), vqa_turns)]


def _write_split(
    root: Path, split: str, scenes: Sequence[Scene], rng: np.random.Generator, max_turns: int, vqa_turns: int | str
) -> dict[str, str]:
    """Write images and task files of one split; returns {task: path relative to root}."""
    img_dir = root / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, list[dict[str, Any]]] = {}
    for i, scene in enumerate(scenes):
        render(scene).save(img_dir / f"{split}_{i:05d}.png", format="PNG", compress_level=1)
        for task, recs in _scene_records(split, i, scene, rng, max_turns, vqa_turns).items():
            tasks.setdefault(task, []).extend(recs)
    if not scenes:
        tasks = {t: [] for t in ("caption", "detailed", "vqa", "grounding")}
    (root / split).mkdir(parents=True, exist_ok=True)
    rel = {}
    for task, recs in tasks.items():
        rel[task] = f"{split}/{task}.json"
        (root / rel[task]).write_text(json.dumps(recs))
    rel["interleaved"] = f"{split}/interleaved.jsonl"
    docs = _interleaved_docs(split, scenes, rng)
    (root / rel["interleaved"]).write_text("".join(json.dumps(d) + "\n" for d in docs))
    return rel


def _resolve(root: Path, rel: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    return {s: {t: str(root / p) for t, p in tasks.items()} for s, tasks in rel.items()}


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Raw ``root/manifest.json``: {"params": {...}, "splits": {split: {task: relative path}}}."""
    return json.loads((Path(root) / "manifest.json").read_text())


def write_world(
    root: str | os.PathLike,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 200,
    seed: int = 0,
    image_size: int = 256,
    max_turns: int = 6,
    noise_prob: float = 0.5,
    vqa_turns: int | str = 1,
    shape_px: Sequence[int] | None = None,
) -> dict[str, dict[str, str]]:
    """Generate the dataset under ``root``; returns {split: {task: absolute path}}.

    ``shape_px=(lo, hi)``: every shape's side in pixels (opt-in; default: 18-45% of ``image_size``),
    e.g. ``image_size=1024, shape_px=(20, 60)`` for the high-resolution task.
    Idempotent: if ``root/manifest.json`` records identical parameters (and its files
    exist) nothing is rewritten. Images live under ``root/images/{split}/``.
    """
    root = Path(root)
    if not (vqa_turns == "type" or (isinstance(vqa_turns, int) and vqa_turns >= 1)):
        raise ValueError(
            f"world.vqa_turns: a number of questions per conversation (1 or more) or 'type', got {vqa_turns!r}"
        )
    bounds = check_shape_px(None if shape_px is None else tuple(shape_px), image_size)
    params = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "max_turns": max_turns,
        "noise_prob": noise_prob,
        "vqa_turns": vqa_turns,
    }
    if bounds is not None:  # only when set: the default world's manifest stays as it was
        params["shape_px"] = list(bounds)
    if (root / "manifest.json").exists():
        old = load_manifest(root)
        files = _resolve(root, old.get("splits", {}))
        if old.get("params") == params and all(Path(p).exists() for t in files.values() for p in t.values()):
            return files
    counts = {"train": n_train, "val": n_val, "test": n_test}
    scenes = {s: split_scenes(seed, s, counts[s], image_size, noise_prob, bounds) for s in SPLITS}
    _check_disjoint(scenes)
    root.mkdir(parents=True, exist_ok=True)
    rel = {s: _write_split(root, s, scenes[s], _split_rng(seed, s, 1), max_turns, vqa_turns) for s in SPLITS}
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps({"params": params, "splits": rel}, indent=2))
    os.replace(tmp, root / "manifest.json")
    return _resolve(root, rel)
