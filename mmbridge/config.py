"""Recipes: typed dataclasses read from YAML, with errors that name the offending key."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmbridge.core import RecipeError, check_spec  # noqa: F401  (RecipeError: also imported from here)
from mmbridge.log_settings import check as check_log
from mmbridge.registry import BRIDGES, OBJECTIVES, SETTINGS, TRAIN_MODES, TRAIN_SPECS, VISION_ENCODERS


@dataclass
class ModelConfig:
    """The three parts of the composite model, each picked by name."""

    vision: dict = field(default_factory=lambda: {"name": "efficientnet_lite0"})
    bridge: dict = field(default_factory=lambda: {"name": "mlp"})
    lm: dict = field(default_factory=dict)
    max_length: int = 512
    system_prompt: str | None = None  # None: the chat template's own default
    # LaVIN's prompt prefix (docs/methods/lavin.md): "Image: " before each image, "Image: N/A" heading a text-only
    # conversation, in training and generation alike; off by default, as it changes every sample's text
    modality_prefix: bool = False
    gradient_checkpointing: bool = False  # recompute LM layers (and a trained ViT's blocks) in the backward pass
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    # keep a frozen encoder's output per image (models/feature_cache.py): later epochs skip the encoder
    feature_cache: bool = False
    # how records' videos are read (data/video.py): {fps: frames taken per second (1), max_frames: most kept (8)}
    video: dict = field(default_factory=dict)
    # a run directory: the build starts from its trained weights (RUN/model/, LoRA injected as it was) instead of a
    # fresh bridge, e.g. a run made by `mmbridge import`; the run must stay where it is (load_run reads it again)
    init: str | None = None
    # how an image becomes encoder views and tokens (data/layouts.py): {mode: none | anyres | uhd | monkey, grids:
    # [[rows, cols], ...] or pinpoints: [[width, height], ...] / "(1x1),...,(6x6)", anyres_max: N, newline: true,
    # global_view: true, max_slices: 6, ...}; anyres gives the bridge a learned `image_newline`
    tiling: dict = field(default_factory=dict)


@dataclass
class DataSource:
    """Where a source's records are and the folder their image paths are relative to.

    LMM stages read LLaVA records from a `json` list, a `jsonl` file (one record a line) or webdataset
    `shards` (`data/shards.py`); LCL stages read an MMC4-style `jsonl` or webdataset `shards` (a folder
    or glob of tars), with `pairs: true` to split documents into image-sentence pairs. `interleaved: true`
    makes an LMM stage read MMC4-style documents from the `jsonl` or `shards` instead (`data/interleaved.py`).
    `boxes_all_objects: true` says that a record whose answers hold boxes boxes every object of its image, as
    detection data does (the `objects` objective then takes its unboxed cells as empty); off, its boxes are
    positives only (RefCOCO-style data boxes one referent).
    `hf_dataset` (a `save_to_disk` folder, or a glob of parquet / arrow files) is read by `data/hf_source.py`:
    `images` then names its image column, `conversations` or `messages` its text column, `split` a split of a
    saved DatasetDict and `image_root` the folder that image paths in it are relative to.
    """

    json: str = ""
    images: str = ""
    jsonl: str = ""
    shards: str = ""
    pairs: bool = False
    interleaved: bool = False
    boxes_all_objects: bool = False
    hf_dataset: str = ""
    split: str = ""
    conversations: str = ""
    messages: str = ""
    image_root: str = ""


@dataclass
class LoraConfig:
    """`layers`: which decoder layers get adapters: all (None), a list of indices, or a number N for the top N.
    With adapters only in the top layers and nothing below them trained, the backward pass stops there."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: Any = None


@dataclass
class MoeConfig:
    """MoE-tuning (`train: {lm: moe}`, see models/moe.py): experts per converted FFN, experts per token, which
    layers (`all`, `every_other` or a list of indices) and the weight of the balancing loss; the gate options
    of MoE-LLaVA's DeepSpeed gate (`second`, `balance`, capacity); `train_ffn` also trains the dense FFNs."""

    experts: int = 4
    top_k: int = 2
    layers: Any = "every_other"
    aux_weight: float = 0.01
    second: str = "top"
    balance: str = "all"
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 0
    train_ffn: bool = False


@dataclass
class MmaConfig:
    """LaVIN's mixture-of-modality adapters (`train: {lm: mma}`, see models/mma.py): bottleneck width, router
    temperature, where in each layer (before attention, as LaVIN's scripts; also before the FFN), the
    up-projections' groups and the dropout after the down-projection; `vision: true` (or `router`) also puts
    LaVIN's router adapters before the attention of each ViT block, `vision: normal` its single-path ones (they
    train with `lr.vision`)."""

    dim: int = 8
    temperature: float = 10.0
    where: list = field(default_factory=lambda: ["attention"])
    groups: int = 2
    dropout: float = 0.1
    vision: Any = False  # false | true (= router) | router | normal


@dataclass
class StageConfig:
    """One training stage: data mix, what trains (frozen / full / lora) and how."""

    name: str = "stage"
    data: dict = field(default_factory=dict)  # source name -> mixture weight
    train: dict = field(default_factory=lambda: {"vision": "frozen", "bridge": "full", "lm": "frozen"})
    lr: dict = field(default_factory=lambda: {"bridge": 1e-3})  # part -> learning rate
    lora: LoraConfig = field(default_factory=LoraConfig)
    moe: MoeConfig = field(default_factory=MoeConfig)
    mma: MmaConfig = field(default_factory=MmaConfig)
    # encode images at this size from this stage on (Qwen-VL: 224, then 448): a ViT tower's positions are
    # interpolated at the stage's start; None keeps the size the previous stage used
    image_size: int | None = None
    steps: int = 100
    epochs: float | None = None  # if set, overrides steps
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.03  # fraction of steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # applied to weight matrices (2+ dims), never to biases and norms
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    eps: float = 1.0e-8
    clip: float = 1.0
    seed: int = 0
    group_by_length: int = 0  # >0: sort each window of this many batches by length (less padding)
    # pack several samples per row (block-diagonal attention, per-sample positions); batch_size then counts
    # rows of model.max_length tokens, holding at most pack_images images each (0: no limit)
    pack: bool = False
    pack_images: int = 0
    # token: every answer token weighs the same; sample: every sample's answer weighs the same, so
    # one-word VQA answers count as much as 17-token boxes (see mmbridge.loss_norm)
    loss_norm: str = "token"
    objective: dict = field(default_factory=lambda: {"name": "lm"})  # name + options


@dataclass
class EvalTask:
    """A held-out evaluation: task kind, data, and how much to generate."""

    task: str = "vqa"  # caption | vqa | grounding
    json: str = ""
    images: str = ""
    max_new_tokens: int = 24
    limit: int | None = None


@dataclass
class Recipe:
    # lmm: a multimodal LM (vision → bridge → LM) trained in stages; lcl: LCL's vision-encoder pretraining
    # (our ViT + a small LM on interleaved documents, the encoder exported at the end). One engine runs both.
    kind: str = "lmm"
    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    sources: dict = field(default_factory=dict)  # name -> DataSource
    # The built-in shapes world, generated on first use: {root, n_train, n_val, n_test, seed, image_size}.
    # Its files are then named in `data` and `eval` as "world/<split>/<task>", e.g. world/train/vqa. Each set of
    # parameters has its own folder under `root` (`mmbridge world RECIPE` prints it), so worlds never overwrite.
    # Opt-in `shape_px: [min, max]` sets every shape's side in pixels (default: 18-45% of image_size); with
    # `image_size: 1024, shape_px: [20, 60]` it is the high-resolution task (benchmarks/highres.py).
    world: dict | None = None
    stages: list = field(default_factory=list)  # list[StageConfig]
    eval: dict = field(default_factory=dict)  # name -> EvalTask
    bad_samples: str = "error"  # error | skip
    save_every: int = 0  # steps between mid-stage checkpoints (0: stage ends only)
    keep_checkpoints: int = 2  # newest checkpoints kept in RUN/checkpoints; 2+ leaves a fallback if one is corrupt
    # Steps with a non-finite loss or gradient are skipped (no update) and counted; this many in a row stop the
    # run with a diagnostic, leaving the last good checkpoint as it was.
    max_nonfinite_steps: int = 3
    log_every: int = 1
    num_workers: int = 0
    threads: int | None = None
    # none: one process; ddp | fsdp under `torchrun` (see docs/guide/training-at-scale.md). The global batch of a
    # step is batch_size x grad_accum whatever the number of processes: each rank takes its slice of every micro-batch.
    strategy: str = "none"
    # auto: this process's GPU when CUDA is available, else the CPU | cpu | cuda | cuda:N (see device.py)
    device: str = "auto"
    # how documents become sequences (max_images, min_sim, image_position, and for kind lcl patches; the
    # length budget is model.max_length): LCL's documents, or an lmm recipe's interleaved sources; and, for
    # kind lcl, the folder inside the run the trained encoder is exported to
    sequence: dict | None = None
    export: str = "encoder"
    # experiment trackers beside metrics.jsonl (train/tracking.py): {tensorboard: true, wandb: {project: P,
    # mode: offline}}; none by default
    log: dict = field(default_factory=dict)


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a plain dict, naming unknown keys and bad types."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise RecipeError(f"{where}.{key}: unknown key; expected one of {sorted(known)}")
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, where)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and type(value) is not hint:
        raise RecipeError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    recipe = _from_dict(Recipe, data, where)
    recipe.stages = [_from_dict(StageConfig, s, f"{where}.stages[{i}]") for i, s in enumerate(recipe.stages)]
    recipe.sources = {k: _from_dict(DataSource, v, f"{where}.sources.{k}") for k, v in recipe.sources.items()}
    recipe.eval = {k: _from_dict(EvalTask, v, f"{where}.eval.{k}") for k, v in recipe.eval.items()}
    validate(recipe)
    return recipe


PARTS = {"lmm": ("vision", "bridge", "lm"), "lcl": ("vision", "lm")}


def _validate_lcl(recipe: Recipe) -> None:
    """The LCL task: objective `lcl`, documents as data, no packing or length grouping."""
    if "max_length" in (recipe.sequence or {}):
        raise RecipeError("recipe.sequence.max_length: the length budget is model.max_length")
    SETTINGS.get("sequence.lcl")({**(recipe.sequence or {}), "max_length": recipe.model.max_length}, "recipe.sequence")
    for name, src in recipe.sources.items():
        if bool(src.jsonl) == bool(src.shards) or src.json:
            raise RecipeError(
                f"recipe.sources.{name}: an lcl source is either {{jsonl, images}} or {{shards}} "
                "(optionally pairs: true)"
            )
    for i, st in enumerate(recipe.stages):
        where = f"recipe.stages[{i}] ({st.name})"
        if st.objective.get("name") != "lcl":
            raise RecipeError(
                f"{where}.objective.name: a kind lcl recipe trains with the lcl objective, "
                f"got {st.objective.get('name')!r}"
            )
        for key in ("pack", "group_by_length"):
            if getattr(st, key):
                raise RecipeError(f"{where}.{key}: not supported for kind lcl (documents are laid out whole)")
        if st.loss_norm != "token":
            raise RecipeError(f"{where}.loss_norm: kind lcl normalises by text tokens (token)")
        for src in st.data:
            if not (
                src in recipe.sources
                or (recipe.world and src.startswith("world/") and src.rsplit("/", 1)[-1] in ("interleaved", "pairs"))
            ):
                raise RecipeError(f"{where}.data.{src}: expected world/<split>/interleaved|pairs or a source")


def _validate_hf_source(recipe: Recipe, name: str, src: DataSource) -> None:
    """An `hf_dataset` source names one text column and nothing of the file sources; the others name no column."""
    where = f"recipe.sources.{name}"
    if not src.hf_dataset:
        for key in ("split", "conversations", "messages", "image_root"):
            if getattr(src, key):
                raise RecipeError(f"{where}.{key}: only for hf_dataset sources")
        return
    if recipe.kind != "lmm" or src.interleaved or src.pairs:
        raise RecipeError(f"{where}.hf_dataset: conversation sources of kind lmm only (not interleaved or lcl)")
    if src.json or src.jsonl or src.shards:
        raise RecipeError(f"{where}: hf_dataset excludes json, jsonl and shards")
    if bool(src.conversations) == bool(src.messages):
        raise RecipeError(
            f"{where}: an hf_dataset source names its text column as either conversations: COLUMN or messages: COLUMN"
        )


def _check_names(recipe: Recipe) -> None:
    """The components a recipe names exist in their registries (`mmbridge/registry.py`)."""
    named = [
        (OBJECTIVES, st.objective.get("name", "lm"), f"recipe.stages[{i}].objective.name")
        for i, st in enumerate(recipe.stages)
    ]
    if recipe.kind == "lmm":
        named += [
            (VISION_ENCODERS, recipe.model.vision.get("name"), "recipe.model.vision.name"),
            (BRIDGES, recipe.model.bridge.get("name"), "recipe.model.bridge.name"),
        ]
    for registry, name, where in named:
        if name not in registry:
            raise RecipeError(f"{where}: unknown {registry.kind} {name!r}; choose one of {registry.names()}")


def validate(recipe: Recipe) -> None:
    """Cross-field checks that dataclass typing cannot express."""
    if recipe.kind not in TRAIN_SPECS:
        raise RecipeError(f"recipe.kind: expected one of {TRAIN_SPECS.names()}, got {recipe.kind!r}")
    check_spec(recipe.device, "recipe.device")
    check_log(recipe.log)
    if recipe.kind == "lcl":
        _validate_lcl(recipe)
    elif recipe.sequence is not None:  # kind lmm: how the interleaved sources' documents are laid out
        SETTINGS.get("sequence.interleaved")(recipe.sequence, "recipe.sequence")
    parts = PARTS[recipe.kind]
    if recipe.bad_samples not in ("error", "skip"):
        raise RecipeError(f"recipe.bad_samples: expected 'error' or 'skip', got {recipe.bad_samples!r}")
    if recipe.strategy not in ("none", "ddp", "fsdp"):
        raise RecipeError(f"recipe.strategy: expected none, ddp or fsdp, got {recipe.strategy!r}")
    for key in ("keep_checkpoints", "max_nonfinite_steps"):
        if getattr(recipe, key) < 1:
            raise RecipeError(f"recipe.{key}: must be at least 1, got {getattr(recipe, key)}")
    if recipe.model.precision not in ("auto", "fp32", "bf16"):
        raise RecipeError(f"recipe.model.precision: expected auto, fp32 or bf16, got {recipe.model.precision!r}")
    SETTINGS.get("model.video")(recipe.model.video, "recipe.model.video")
    _check_names(recipe)
    for i, st in enumerate(recipe.stages):
        where = f"recipe.stages[{i}] ({st.name})"
        if st.pack and st.group_by_length:
            raise RecipeError(f"{where}: pack and group_by_length exclude each other (packing leaves no padding)")
        if st.pack and st.objective.get("name", "lm") not in ("lm", "croc"):
            raise RecipeError(
                f"{where}.pack: packing works with the lm and croc objectives, not {st.objective.get('name')!r}"
            )
        if st.loss_norm not in ("token", "sample"):
            raise RecipeError(f"{where}.loss_norm: expected token or sample, got {st.loss_norm!r}")
        if st.pack_images < 0:
            raise RecipeError(f"{where}.pack_images: must be 0 (no limit) or positive, got {st.pack_images}")
        if st.image_size is not None:
            if st.image_size < 1:
                raise RecipeError(f"{where}.image_size: must be positive, got {st.image_size}")
            if recipe.kind != "lmm" or recipe.strategy == "fsdp":
                raise RecipeError(
                    f"{where}.image_size: a stage's resolution can change in kind lmm recipes without "
                    "FSDP (single process or ddp)"
                )
        SETTINGS.get("moe")(st.moe, f"{where}.moe")
        SETTINGS.get("mma")(st.mma, f"{where}.mma")
        if st.mma.vision and st.train.get("lm") == "mma" and "vision" not in st.lr:
            raise RecipeError(f"{where}.lr.vision: missing learning rate for the vision adapters (mma.vision)")
        if len(st.betas) != 2 or not all(0 <= b < 1 for b in st.betas):
            raise RecipeError(f"{where}.betas: expected two numbers in [0, 1), got {st.betas!r}")
        for part, mode in st.train.items():
            if part not in parts:
                raise RecipeError(f"{where}.train.{part}: unknown part; expected one of {list(parts)}")
            if mode not in TRAIN_MODES:
                raise RecipeError(f"{where}.train.{part}: unknown mode {mode!r}; expected one of {TRAIN_MODES.names()}")
            if mode in ("moe", "mma") and part != "lm" or mode == "lora" and part == "bridge":
                raise RecipeError(
                    f"{where}.train.{part}: {mode} is supported for the lm only"
                    + (
                        " (and lora for the vision encoder's per-window adapters, model.tiling.mode=monkey)"
                        if mode == "lora"
                        else ""
                    )
                )
            if mode != "frozen" and part not in st.lr:
                raise RecipeError(f"{where}.lr.{part}: missing learning rate for a part that trains")
        for part in st.lr:
            if part not in parts and part != "objective":
                raise RecipeError(f"{where}.lr.{part}: unknown part; expected one of {list(parts)}")
        for src, w in st.data.items():
            if src not in recipe.sources and not (recipe.world and src.startswith("world/")):
                raise RecipeError(f"{where}.data.{src}: not a source in recipe.sources ({sorted(recipe.sources)})")
            if not isinstance(w, (int, float)) or w <= 0:
                raise RecipeError(f"{where}.data.{src}: weight must be a positive number, got {w!r}")
        if not st.data:
            raise RecipeError(f"{where}.data: a stage needs at least one data source")
    for name, src in recipe.sources.items():
        _validate_hf_source(recipe, name, src)
        if recipe.kind == "lmm" and src.interleaved and (bool(src.jsonl) == bool(src.shards) or src.json):
            raise RecipeError(f"recipe.sources.{name}: an interleaved source is {{jsonl, images}} or {{shards}}")
    for name, ev in recipe.eval.items():
        if ev.task not in ("caption", "vqa", "grounding"):
            raise RecipeError(f"recipe.eval.{name}.task: expected caption, vqa or grounding, got {ev.task!r}")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.0.c=value` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        node: Any = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe file (or a bundled recipe name such as `demo`)."""
    path = Path(path)
    if not path.exists():
        bundled = Path(__file__).parent / "recipes" / f"{path.stem}.yaml"
        if path.suffix in ("", ".yaml") and bundled.exists():
            path = bundled
        else:
            raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from e
    data = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, where=str(path.name))


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
