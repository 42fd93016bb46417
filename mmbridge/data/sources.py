"""Resolve a recipe's data names to files, generating the built-in shapes world on first use."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from mmbridge.config import DataSource, Recipe, RecipeError

WORLD_DEFAULTS = {
    "root": ".cache/shapes-world",
    "n_train": 2000,
    "n_val": 100,
    "n_test": 200,
    "seed": 0,
    "image_size": 256,
    "vqa_turns": 1,
    "videos": None,
    "shape_px": None,
}  # [min, max] shape side in pixels (the high-resolution task); None: 18-45%
# the world's sets whose box answers box every object of their image (a test record boxes one referent, and a
# `mixed` conversation one or two objects): their sources have boxes_all_objects
WORLD_BOXES_ALL_OBJECTS = {("train", "grounding"), ("train", "multitask")}


def world_manifest(world: dict) -> tuple[dict, Path]:
    """Generate (or reuse) the shapes world described by a recipe's `world` section; with `videos` (a mapping
    of `shapes_video.DEFAULTS`' keys, or {} for the defaults) also its videos, as each split's `video` task."""
    from mmbridge.data.shapes_video import write_videos
    from mmbridge.data.shapes_world import write_world

    unknown = set(world) - set(WORLD_DEFAULTS)
    if unknown:
        raise RecipeError(f"recipe.world: unknown key(s) {sorted(unknown)}; expected some of {sorted(WORLD_DEFAULTS)}")
    cfg = {**WORLD_DEFAULTS, **world}
    root, videos = Path(cfg.pop("root")), cfg.pop("videos")
    root = world_folder(root, cfg)
    try:
        if not (root / "manifest.json").exists():
            publish_world(root, cfg)
        manifest = write_world(root, **cfg)  # the published world's own files, or (one gone) made again in place
    except ValueError as e:
        raise RecipeError(f"recipe.{e}") from e
    if videos is not None:
        if not isinstance(videos, dict):
            raise RecipeError(f"recipe.world.videos: expected a mapping (e.g. {{n_train: 1000}}), got {videos!r}")
        try:
            for split, path in write_videos(root, seed=cfg["seed"], **videos).items():
                manifest[split]["video"] = path
        except ValueError as e:
            raise RecipeError(f"recipe.{e}") from e
    return manifest, root / "images"


def world_folder(root: Path, cfg: dict) -> Path:
    """The folder under a recipe's world `root` that holds the world of parameters `cfg` (write_world's): worlds of other
    parameters (another recipe's, an override's) live beside it, so runs on different worlds never rewrite each
    other's files."""
    from mmbridge.data.shapes_world import GENERATOR_VERSION

    key = json.dumps({"version": GENERATOR_VERSION, **cfg}, sort_keys=True)
    return root / f"v{GENERATOR_VERSION}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def publish_world(folder: Path, cfg: dict) -> None:
    """Generate the world in a private folder and rename it to `folder` whole, so a reader never sees it half
    written; when another process published the same world first, keep theirs."""
    from mmbridge.data.shapes_world import write_world

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_world(tmp, **cfg)
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "manifest.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_source(recipe: Recipe, name: str) -> DataSource:
    """`name` is a key of `recipe.sources`, or `world/<split>/<task>` for the built-in world (its
    `interleaved` task: MMC4-style documents, an interleaved source; `video`: its videos, if it has them)."""
    if name in recipe.sources:
        return recipe.sources[name]
    if name.startswith("world/"):
        if not recipe.world:
            raise RecipeError(f"data {name!r}: the recipe has no `world` section")
        parts = name.split("/")
        manifest, images = world_manifest(recipe.world)
        if len(parts) != 3 or parts[1] not in manifest or parts[2] not in manifest[parts[1]]:
            valid = [f"world/{s}/{t}" for s in manifest for t in manifest[s]]
            raise RecipeError(f"data {name!r}: expected one of {valid}")
        if parts[2] == "interleaved":  # MMC4-style documents, one a line
            return DataSource(jsonl=str(manifest[parts[1]][parts[2]]), images=str(images), interleaved=True)
        return DataSource(
            json=str(manifest[parts[1]][parts[2]]),
            images=str(images),
            boxes_all_objects=(parts[1], parts[2]) in WORLD_BOXES_ALL_OBJECTS,
        )
    raise RecipeError(f"data {name!r}: not in recipe.sources ({sorted(recipe.sources)}) nor world/<split>/<task>")
