"""`mmbridge import`: a transformers LLaVA folder (`LlavaForConditionalGeneration` with an HF tower and its
Linear-GELU-Linear projector, or `LlavaNextForConditionalGeneration`: the same plus AnyRes, its candidate grids
and learned `image_newline`) → an mmbridge run directory that `load_run`, `eval`, `chat`, `serve` and further
training (`model.init`) use.

The run carries every weight itself::

    RUN/vision/     the vision tower as an HF folder (config, safetensors, preprocessor_config.json), manifest
    RUN/lm/         the causal LM as an HF folder (config, safetensors, tokenizer), manifest
    RUN/tokenizer/  the tokenizer (image token, a chat template that takes plain-string contents)
    RUN/model/      the projector as the `mlp` bridge (model.safetensors, meta.json, manifest), LLaVA-NeXT's newline
    RUN/recipe.yaml vision {name: hf, path: RUN/vision, ...}, bridge {name: mlp}, lm {path: RUN/lm}, for
                    LLaVA-NeXT tiling {mode: anyres, grids: its pinpoints}; no stages

Recipe paths are absolute: a moved run needs its recipe's `model.vision.path` and `model.lm.path` edited.
The whole directory is filled under a temporary name and renamed into place at the end.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from mmbridge.interop import InteropError, folders
from mmbridge.interop.chat_template import string_content_template
from mmbridge.models.language import IMAGE_TOKEN

CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


class LlavaImportError(InteropError):
    """A folder mmbridge cannot hold as tower + `mlp` bridge + causal LM; the message names the field."""


def _check_config(src: Path, config) -> None:
    where = f"{src}/config.json"
    if config.model_type not in CLASSES:
        raise LlavaImportError(
            f"{where}: model_type {config.model_type!r}; mmbridge import reads "
            "LlavaForConditionalGeneration and LlavaNextForConditionalGeneration folders "
            "(model_type llava, llava_next)"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise LlavaImportError(
            f"{where}: vision_feature_layer {config.vision_feature_layer} concatenates several "
            "layers; mmbridge's hf encoder reads one (feature_layer)"
        )
    if config.projector_hidden_act != "gelu":
        raise LlavaImportError(
            f"{where}: projector_hidden_act {config.projector_hidden_act!r}; the mlp bridge runs exact GELU (gelu)"
        )
    if not config.multimodal_projector_bias:
        raise LlavaImportError(f"{where}: multimodal_projector_bias false; the mlp bridge's layers have biases")
    for attr in ("image_size", "patch_size", "hidden_size"):
        if not hasattr(config.vision_config, attr):
            raise LlavaImportError(
                f"{where}: vision_config ({config.vision_config.model_type}) has no {attr}; "
                "mmbridge's hf encoder takes ViT-style towers"
            )


def _anyres_tiling(src: Path, config) -> dict:
    """LLaVA-NeXT's pinpoints as our AnyRes grids, in its order. transformers reads each pinpoint as (height,
    width) (LLaVA-NeXT's own code as (width, height)): the grids follow transformers, whose forward we match."""
    size, grids = int(config.vision_config.image_size), []
    for pin in config.image_grid_pinpoints:
        height, width = (int(x) for x in pin)
        if height % size or width % size:
            raise LlavaImportError(
                f"{src}/config.json: image_grid_pinpoints {list(pin)} is not a grid of "
                f"{size}-pixel tiles; mmbridge's AnyRes cuts whole tiles"
            )
        grids.append([height // size, width // size])
    return {"mode": "anyres", "grids": grids, "newline": True, "global_view": True}


def _drop_cls(src: Path, config, tower) -> bool:
    """LLaVA's feature selection as our encoder's `drop_cls` (it drops all special tokens, LLaVA exactly one)."""
    has_cls = any(hasattr(m, "class_embedding") or hasattr(m, "cls_token") for m in tower.modules())
    special = int(has_cls) + int(getattr(config.vision_config, "num_register_tokens", 0) or 0)
    if config.vision_feature_select_strategy == "full":
        return False
    if special != 1:
        raise LlavaImportError(
            f"{src}/config.json: vision_feature_select_strategy 'default' drops the first "
            f"token, but this tower emits {special} special tokens before its patches; mmbridge "
            "drops all of them or none"
        )
    return True


def _trimmed_vocab(llava) -> int:
    """The vocabulary without trailing rows that an mmbridge export appended: zero, and suppressed in generation."""
    vocab = int(llava.config.text_config.vocab_size)
    suppressed = set(getattr(llava.generation_config, "suppress_tokens", None) or ())
    emb, head = llava.get_input_embeddings().weight, llava.lm_head.weight
    keep = vocab
    while keep > 0 and keep - 1 in suppressed and not emb[keep - 1].any() and not head[keep - 1].any():
        keep -= 1
    return keep


def _save_lm(llava, folder: Path, vocab: int) -> None:
    """The LLaVA's language model and lm_head as one AutoModelForCausalLM folder (first `vocab` rows)."""
    from transformers import AutoModelForCausalLM

    text = copy.deepcopy(llava.config.text_config)
    text.vocab_size = vocab
    text.tie_word_embeddings = bool(llava.config.tie_word_embeddings)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text)
    prefix = lm.base_model_prefix + "."
    inner = llava.model.language_model
    if type(getattr(lm, lm.base_model_prefix)) is not type(inner):
        raise LlavaImportError(
            f"text_config ({text.model_type}): AutoModelForCausalLM wraps a "
            f"{type(getattr(lm, lm.base_model_prefix)).__name__}, the LLaVA holds a "
            f"{type(inner).__name__}"
        )
    emb = next(n for n, m in inner.named_modules() if m is inner.get_input_embeddings()) + ".weight"
    state = {prefix + k: (v[:vocab] if k == emb else v) for k, v in inner.state_dict().items()}
    state["lm_head.weight"] = llava.lm_head.weight[:vocab]
    lm.load_state_dict({k: v.detach().contiguous() for k, v in state.items()}, strict=True, assign=True)
    if text.tie_word_embeddings:
        lm.tie_weights()
    buffers = dict(inner.named_buffers())
    for name, buf in list(lm.named_buffers()):
        if buf.is_meta and name[len(prefix) :] in buffers:
            owner, _, leaf = name.rpartition(".")
            lm.get_submodule(owner)._buffers[leaf] = buffers[name[len(prefix) :]]
    lm.save_pretrained(str(folder))


def _chat_template(src: Path, processor, tokenizer) -> str:
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        raise LlavaImportError(
            f"{src}: no chat template (chat_template.jinja, or chat_template in "
            "tokenizer_config.json); mmbridge renders every conversation with one"
        )
    return string_content_template(template)


def _preprocessing_notes(src: Path, image_processor, size: int) -> list[str]:
    """Where the source's image preprocessing differs from ours (a square resize, no crop or padding)."""
    notes = []
    if getattr(image_processor, "do_center_crop", False) or "shortest_edge" in (
        getattr(image_processor, "size", None) or {}
    ):
        notes.append("its image processor resizes the shortest edge and center-crops")
    if getattr(image_processor, "do_pad", False):
        notes.append("its image processor pads images to a square")
    return [
        f"note: {src}: {n}; mmbridge resizes whole images to {size}x{size} (the same for square images)" for n in notes
    ]


def import_llava(src: str | Path, out_dir: str | Path, say=print) -> Path:
    """Write the LLaVA folder `src` as an mmbridge run directory `out_dir` (see the module docstring)."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from mmbridge.config import recipe_from_dict
    from mmbridge.interop.llava_processor import image_processor as square_processor
    from mmbridge.models.build import build_model
    from mmbridge.runs import save_recipe
    from mmbridge.train.checkpoint import save_weights, write_folder

    src, out = Path(src), Path(out_dir)
    folders.check_new(out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected a LlavaForConditionalGeneration folder)")
    config = AutoConfig.from_pretrained(str(src))
    _check_config(src, config)
    try:
        processor = AutoProcessor.from_pretrained(str(src))
    except (OSError, ValueError, TypeError) as e:
        raise LlavaImportError(f"{src}: AutoProcessor cannot load its processor files: {e}") from e
    tokenizer = copy.deepcopy(processor.tokenizer)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_id:
        raise LlavaImportError(
            f"{src}/config.json: image_token_index {config.image_token_id} is not the id of "
            f"{IMAGE_TOKEN!r} in its tokenizer ({tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)})"
        )
    tokenizer.chat_template = _chat_template(src, processor, tokenizer)
    llava_class = getattr(transformers, CLASSES[config.model_type])
    tiling = _anyres_tiling(src, config) if config.model_type == "llava_next" else None
    llava, info = llava_class.from_pretrained(str(src), dtype="auto", output_loading_info=True)
    missing, mismatched = sorted(info.get("missing_keys") or []), list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise LlavaImportError(
            f"{src}: its safetensors lack or misshape weights its config asks for: "
            f"missing {missing[:5]}, mismatched {mismatched[:5]}"
        )
    drop_cls = _drop_cls(src, config, llava.model.vision_tower)
    size = int(config.vision_config.image_size)
    ip = processor.image_processor
    staged = folders.staging(out)
    stage = staged.path
    try:
        vision_tmp, lm_tmp, tok_tmp = stage / ".vision.tmp", stage / ".lm.tmp", stage / ".tokenizer.tmp"
        llava.model.vision_tower.save_pretrained(str(vision_tmp))
        square_processor(size, ip.image_mean, ip.image_std).save_pretrained(str(vision_tmp))
        _save_lm(llava, lm_tmp, _trimmed_vocab(llava))
        tokenizer.save_pretrained(str(lm_tmp))
        tokenizer.save_pretrained(str(tok_tmp))
        for name in ("vision", "lm", "tokenizer"):
            write_folder(stage / name, {}, filled=stage / f".{name}.tmp")
        text = config.text_config
        model_cfg = {
            "vision": {"name": "hf", "feature_layer": int(config.vision_feature_layer), "drop_cls": drop_cls},
            "bridge": {"name": "mlp", "depth": 2},
            "max_length": int(min(getattr(text, "max_position_embeddings", 2048) or 2048, 4096)),
            **({"tiling": tiling} if tiling else {}),
        }

        def recipe(root: Path):
            return recipe_from_dict(
                {
                    "name": out.name,
                    "model": {
                        **model_cfg,
                        "vision": {**model_cfg["vision"], "path": str(root / "vision")},
                        "lm": {"path": str(root / "lm"), "dtype": str(llava.dtype).removeprefix("torch.")},
                    },
                }
            )

        model, our_processor = build_model(recipe(stage).model)  # loads the written folders: they must work
        proj = llava.model.multi_modal_projector
        with torch.no_grad():
            for i, layer in ((0, proj.linear_1), (2, proj.linear_2)):
                model.bridge.proj[i].weight.copy_(layer.weight)
                model.bridge.proj[i].bias.copy_(layer.bias)
            if tiling:
                model.bridge.image_newline.copy_(llava.model.image_newline)
        if not tiling and our_processor.num_image_tokens != config.image_seq_length:
            say(
                f"note: {src}/config.json: image_seq_length {config.image_seq_length}, but the tower gives "
                f"{our_processor.num_image_tokens} tokens per image (used)"
            )
        keys = {k for k, _ in model.bridge.named_parameters(prefix="bridge")}
        save_weights(
            model,
            keys,
            stage / "model",
            {"keys": sorted(keys), "lora": None, "stage": 0, "step": 0, "imported_from": str(src.resolve())},
        )
        save_recipe(recipe(out.resolve()), stage)
        (stage / "imported.json").write_text(json.dumps({"format": 1, "source": str(src.resolve())}, indent=2))
    except BaseException:
        folders.discard(staged)
        raise
    folders.publish(staged)  # refused: OUT untouched, the finished run kept and named
    for line in _preprocessing_notes(src, ip, size):
        say(line)
    say(
        f"imported {src} into the run directory {out} ({our_processor.num_image_tokens} tokens per image, "
        f"feature_layer {config.vision_feature_layer}, drop_cls {drop_cls})"
    )
    return out
