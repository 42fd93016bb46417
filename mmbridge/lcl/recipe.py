"""LCL recipes (`kind: lcl`): typed sections, unknown keys named, and where their documents come from.

Data names: `world/<split>/interleaved` (the built-in world's documents), `world/<split>/pairs` (each
of their images with its matched sentence), or a key of `sources`: `{jsonl, images}` for an
MMC4-style file, `{shards}` (a folder or glob of webdataset tars); `pairs: true` splits into pairs.
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmbridge.config import RecipeError, _from_dict, apply_overrides
from mmbridge.lcl.sequence import Document, SequenceConfig

SOURCE_KEYS = {"jsonl", "images", "shards", "pairs"}


@dataclass
class LCLObjective:
    lambda_con: float = 0.1  # λ of L_con
    gen_weight: float = 1.0  # 0: contrastive only
    init_temperature: float = 0.07  # logit scale starts at 1/0.07
    max_scale: float = 100.0


@dataclass
class LCLRecipe:
    kind: str = "lcl"
    name: str = "lcl"
    seed: int = 0
    world: dict | None = None  # as in other recipes: {root, n_train, n_val, n_test, seed, image_size}
    sources: dict = field(default_factory=dict)
    data: list = field(default_factory=lambda: ["world/train/interleaved"])
    vision: dict = field(default_factory=dict)  # ViTConfig fields (out_dim is the LM's width)
    lm: dict = field(default_factory=lambda: {"tokenizer": "words"})  # tokenizer + Llama sizes, or path
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    objective: LCLObjective = field(default_factory=LCLObjective)
    steps: int = 300
    batch_size: int = 16  # documents per process and step
    lr: float = 1.0e-3
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    clip: float = 1.0
    threads: int | None = None
    log_every: int = 1
    save_every: int = 0
    export: str = "encoder"  # the exported encoder's folder inside the run directory
    device: str = "auto"  # auto | cpu | cuda


def recipe_path(path: str | Path) -> Path:
    """A YAML file, or a bundled recipe name (`lcl`)."""
    path = Path(path)
    if path.exists():
        return path
    bundled = Path(__file__).parent.parent / "recipes" / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml") and bundled.exists():
        return bundled
    raise RecipeError(f"{path}: recipe file not found")


def _read(path: str | Path) -> dict:
    p = recipe_path(path)
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: invalid YAML: {e}") from e


def is_lcl_recipe(path: str | Path) -> bool:
    try:
        data = _read(path)
    except RecipeError:
        return False
    return isinstance(data, dict) and data.get("kind") == "lcl"


def load_lcl_recipe(path: str | Path, overrides: list[str] | None = None) -> LCLRecipe:
    data = apply_overrides(_read(path), overrides or [])
    return lcl_recipe_from_dict(data, recipe_path(path).name)


def lcl_recipe_from_dict(data: dict, where: str = "recipe") -> LCLRecipe:
    try:
        recipe = _from_dict(LCLRecipe, data, where)
    except ValueError as e:  # SequenceConfig's own checks
        raise RecipeError(f"{where}: {e}") from e
    if recipe.kind != "lcl":
        raise RecipeError(f"{where}.kind: expected 'lcl', got {recipe.kind!r}")
    for name, src in recipe.sources.items():
        bad = set(src) - SOURCE_KEYS if isinstance(src, dict) else {"(not a mapping)"}
        if bad or not ({"jsonl", "shards"} & set(src)):
            raise RecipeError(f"{where}.sources.{name}: expected {{jsonl, images}} or {{shards}} "
                              f"(optionally pairs: true); unknown {sorted(bad)}")
    for name in recipe.data:
        if name not in recipe.sources and not (recipe.world and str(name).startswith("world/")):
            raise RecipeError(f"{where}.data: {name!r} is neither world/<split>/interleaved|pairs nor a source")
    return recipe


def recipe_to_dict(recipe: LCLRecipe) -> dict:
    return dataclasses.asdict(recipe)


def resolve_documents(recipe: LCLRecipe, name: str) -> list[Document] | list[str]:
    """Documents of a data name (read into memory), or the shard paths of a `shards` source."""
    from mmbridge.lcl.readers import as_pairs, read_jsonl

    if name.startswith("world/") and name not in recipe.sources:
        from mmbridge.data.sources import world_manifest

        parts = name.split("/")
        manifest, images = world_manifest(recipe.world)
        if len(parts) != 3 or parts[1] not in manifest or parts[2] not in ("interleaved", "pairs"):
            raise RecipeError(f"data {name!r}: expected world/<{'|'.join(manifest)}>/<interleaved|pairs>")
        docs = read_jsonl(manifest[parts[1]]["interleaved"], images)
        return as_pairs(docs) if parts[2] == "pairs" else docs
    src = recipe.sources[name]
    if "shards" in src:
        pattern = str(src["shards"])
        urls = sorted(glob.glob(str(Path(pattern) / "*.tar")) if Path(pattern).is_dir() else glob.glob(pattern))
        if not urls:
            raise RecipeError(f"sources.{name}.shards: no tar files match {pattern!r}")
        return urls
    docs = read_jsonl(src["jsonl"], src.get("images", ""))
    return as_pairs(docs) if src.get("pairs") else docs
