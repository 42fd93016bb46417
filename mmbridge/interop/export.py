"""`mmbridge export`: a trained run → a stock transformers `LlavaForConditionalGeneration` folder (or
`FastVlmForConditionalGeneration` for EfficientNet-Lite0, see `fastvlm.py`).

Supported exactly: an `hf` vision tower (CLIP, SigLIP, DINOv2 without registers, or any tower `AutoModel`
builds from its config) or EfficientNet-Lite0's head + the `mlp` bridge (Linear-GELU-Linear, LLaVA-1.5's
projector) + any causal LM `AutoModelForCausalLM` builds. LoRA adapters are merged into the LM's weights.
The mapping:

* `model.vision.feature_layer` → `vision_feature_layer` (both index the tower's `hidden_states`, input
  embeddings first, in the same capture code of transformers);
* `drop_cls: true` on a tower with one CLS token → `vision_feature_select_strategy: default` (LLaVA drops
  exactly the first token); a tower without one, or `drop_cls: false` → `full`;
* `bridge.proj.0` / `bridge.proj.2` → `multi_modal_projector.linear_1` / `linear_2`;
* tokens per image → `image_seq_length`; the image token gets a zero row if the LM's vocabulary lacks it
  (mmbridge never embeds it), suppressed in `generation_config.json` with any other new id.

A run under `model.tiling: {mode: anyres}` (newline and global view on, no anyres_max) with an `hf` tower is
written as `LlavaNextForConditionalGeneration`: its grids as `image_grid_pinpoints` (height, width, as
transformers reads them), the bridge's `image_newline` as the model's.
Anything else raises `ExportError`, naming the recipe key in the way and what to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from mmbridge.config import ModelConfig
from mmbridge.interop import InteropError, folders
from mmbridge.interop.merge import merge_lora

# bridges LlavaMultiModalProjector cannot express, and why
_BRIDGES = {
    "linear": "a single Linear layer; LLaVA's projector is Linear-GELU-Linear (train with {name: mlp, depth: 2})",
    "pool_adapter": "average-pools the token grid before its MLP; LLaVA's projector maps every encoder token "
    "(train with {name: mlp})",
    "qformer": "a Q-Former (BLIP-2), not a per-token projector",
    "resampler": "a Perceiver Resampler (Flamingo), not a per-token projector",
    "gated_xattn": "adds cross-attention blocks inside the LM (deep fusion), which LLaVA has not",
    "visual_expert": "adds visual-expert weights inside every LM layer (deep fusion), which LLaVA has not",
    "objects": "an object detector read out as the LM's word and digit tokens, which LLaVA's projector is not",
}
_VISION = {"lcl_vit": "mmbridge's own ViT, which transformers cannot build"}
ARCHS = {"hf": "LlavaForConditionalGeneration", "efficientnet_lite0": "FastVlmForConditionalGeneration"}
NEXT = "LlavaNextForConditionalGeneration"  # an hf tower under AnyRes


class ExportError(InteropError):
    """A run whose model stock transformers cannot hold as LLaVA; the message names what blocks it."""


@dataclass
class LlavaLayout:
    """How the run's encoder output maps onto LLaVA's (or FastVLM's) feature selection."""

    architecture: str  # LlavaForConditionalGeneration | FastVlmForConditionalGeneration
    feature_layer: int
    strategy: str  # "default" (drop the one CLS token) or "full"
    num_additional_image_tokens: int  # special tokens the tower emits, for LlavaProcessor's count
    image_seq_length: int
    patch_size: int
    image_size: int
    pinpoints: list | None = None  # LLaVA-NeXT: the AnyRes grids in pixels, (height, width) as transformers reads


def recipe_blockers(cfg: ModelConfig) -> list[str]:
    """What in a recipe's `model` section keeps it from being a LLaVA (empty: nothing, as far as the recipe says)."""
    found = []
    vision, bridge = dict(cfg.vision), dict(cfg.bridge)
    name = vision.get("name")
    if name not in ARCHS:
        found.append(f"model.vision.name: {name} is {_VISION.get(name, 'not an hf tower or efficientnet_lite0')}")
    elif name == "efficientnet_lite0":
        from mmbridge.interop.fastvlm import blockers

        found += blockers(vision)
    else:
        if vision.get("post_layernorm"):
            found.append(
                "model.vision.post_layernorm: true applies the tower's final LayerNorm to the selected "
                "layer, which LLaVA does not; train with post_layernorm: false"
            )
    kind = bridge.get("name")
    if bridge.get("concepts"):
        found.append(
            "model.bridge.concepts: concept tokens (the LM's word embeddings picked by detectors) have "
            "no LLaVA or FastVLM counterpart"
        )
    if getattr(cfg, "modality_prefix", False):
        found.append(
            "model.modality_prefix: true writes LaVIN's 'Image:' / 'Image: N/A' into every prompt, which the "
            "exported chat template does not; export a run trained without it"
        )
    if kind in _BRIDGES:
        found.append(f"model.bridge.name: {kind} is {_BRIDGES[kind]}")
    elif kind != "mlp":
        found.append(f"model.bridge.name: {kind!r} is not the mlp bridge LLaVA's projector holds")
    else:
        if bridge.get("depth", 2) != 2:
            found.append(
                f"model.bridge.depth: {bridge['depth']} layers; LLaVA's projector is exactly "
                "Linear-GELU-Linear (depth: 2)"
            )
        if bridge.get("norm"):
            found.append(
                "model.bridge.norm: true puts a LayerNorm before the projector, which LLaVA's projector "
                "lacks; train with norm: false"
            )
        if bridge.get("l2_normalize"):
            found.append(
                "model.bridge.l2_normalize: true rescales every visual token to unit norm, which LLaVA "
                "does not; train with l2_normalize: false"
            )
    for key in ("pos_embed", "pooled"):
        if key in bridge and kind == "pool_adapter":
            found.append(f"model.bridge.{key}: a pool_adapter option; LLaVA has no pooling or per-cell embedding")
    tiling = dict(getattr(cfg, "tiling", None) or {})
    mode = tiling.get("mode", "none")
    if mode == "anyres" and cfg.vision.get("name") == "hf":  # exported as LLaVA-NeXT
        for key, why in (("newline", "adds a newline after every row"), ("global_view", "reads a global view")):
            if tiling.get(key, True) is False:
                found.append(f"model.tiling.{key}: false; LLaVA-NeXT {why}")
        if tiling.get("anyres_max") is not None:
            found.append("model.tiling.anyres_max: LLaVA-NeXT never shrinks the map (LLaVA-OneVision does)")
    elif mode != "none":
        found.append(
            f"model.tiling.mode: {mode} gives each image its own views and token count; the exported "
            "LLaVA reads one S×S view per image"
        )
    return found


def _check_projector(proj: nn.Module) -> None:
    """The bridge module itself must be Linear, exact GELU, Linear (what `projector_hidden_act: gelu` runs)."""
    layers = list(proj) if isinstance(proj, nn.Sequential) else []
    shape_ok = (
        len(layers) == 3
        and isinstance(layers[0], nn.Linear)
        and isinstance(layers[2], nn.Linear)
        and isinstance(layers[1], (nn.GELU, nn.Sigmoid))
        and all(m.bias is not None for m in (layers[0], layers[2]))
    )
    if not shape_ok:
        raise ExportError(
            f"model.bridge: the projector is {proj}, not Linear-GELU-Linear (or Linear-Sigmoid-Linear) with biases"
        )
    if isinstance(layers[1], nn.GELU) and layers[1].approximate != "none":
        raise ExportError(f"model.bridge: GELU(approximate={layers[1].approximate!r}); LLaVA's `gelu` is exact")


def _auto_class(model_type: str, table: str) -> str | None:
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, table).get(model_type)


def layout(model, cfg: ModelConfig) -> LlavaLayout:
    """Check the loaded model against LLaVA / FastVLM and return the settings that reproduce it; ExportError
    otherwise."""
    blockers = recipe_blockers(cfg)
    if blockers:
        raise ExportError("cannot export:\n  " + "\n  ".join(blockers))
    plan = _hf_layout(model) if cfg.vision.get("name") == "hf" else _efficientnet_layout(model)
    tiling = getattr(model, "tiling", None)
    if tiling is not None and tiling.mode == "anyres":
        size = plan.image_size
        plan = replace(plan, architecture=NEXT, pinpoints=[[r * size, c * size] for r, c in tiling.grids])
    if model.bridge.num_tokens != plan.image_seq_length:
        raise ExportError(
            f"model.bridge: {model.bridge.num_tokens} tokens per image, but {plan.architecture} "
            f"would give {plan.image_seq_length}"
        )
    _check_projector(model.bridge.proj)
    _check_lm(model.lm)
    return plan


def _hf_layout(model) -> LlavaLayout:
    enc, tower = model.vision, model.vision.model
    vc = tower.config
    want = _auto_class(vc.model_type, "MODEL_MAPPING_NAMES")
    if want != type(tower).__name__:
        raise ExportError(
            f"model.vision.path: the tower is a {type(tower).__name__}, but AutoModel builds "
            f"{want or 'nothing'} from its config ({vc.model_type}), as LLaVA would"
        )
    if enc.image_size != int(vc.image_size):
        raise ExportError(
            f"model.vision.image_size: {enc.image_size} px differs from the tower's "
            f"{vc.image_size}; LLaVA does not interpolate position embeddings (drop image_size)"
        )
    n_special = enc._n_special
    if enc.drop_cls and n_special > 1:
        raise ExportError(
            f"model.vision.drop_cls: true drops {n_special} tokens (CLS and "
            f"{n_special - 1} registers); LLaVA's `default` strategy drops exactly one. Use a tower "
            "without registers, or drop_cls: false (all tokens kept: `full`)"
        )
    strategy = "default" if enc.drop_cls and n_special == 1 else "full"
    kept = 0 if enc.drop_cls else n_special
    return LlavaLayout(
        architecture=ARCHS["hf"],
        feature_layer=enc.feature_layer,
        strategy=strategy,
        num_additional_image_tokens=n_special if strategy == "default" else kept,
        image_seq_length=enc.grid[0] * enc.grid[1] + kept,
        patch_size=int(vc.patch_size),
        image_size=enc.image_size,
    )


def _efficientnet_layout(model) -> LlavaLayout:
    """FastVLM reads the tower's last feature map, flattened row-major: one token per cell (stride 32, or 16 for
    a cut after blocks 4 to 10)."""
    enc = model.vision
    return LlavaLayout(
        architecture=ARCHS["efficientnet_lite0"],
        feature_layer=-1,
        strategy="full",
        num_additional_image_tokens=0,
        image_seq_length=enc.grid[0] * enc.grid[1],
        patch_size=enc.image_size // enc.grid[0],
        image_size=enc.image_size,
    )


def _check_lm(lm: nn.Module) -> None:
    tc = lm.config
    causal, base = (
        _auto_class(tc.model_type, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
        _auto_class(tc.model_type, "MODEL_MAPPING_NAMES"),
    )
    inner = getattr(lm, lm.base_model_prefix, None)
    if causal != type(lm).__name__ or inner is None or type(inner).__name__ != base:
        raise ExportError(
            f"model.lm.path: the LM is a {type(lm).__name__}; LLaVA rebuilds {base} + lm_head from "
            f"its config ({tc.model_type}), which must be the same model"
        )
    head = lm.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None or getattr(lm, "lm_head", None) is not head:
        raise ExportError(f"model.lm.path: the LM's output layer is {head}; LLaVA's lm_head is a Linear without bias")


def _padded(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with zero rows appended up to `rows` (new token ids, never embedded by mmbridge)."""
    extra = rows - weight.shape[0]
    return weight if extra <= 0 else torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])])


def _tower(model, plan: LlavaLayout) -> tuple[dict, dict[str, torch.Tensor]]:
    """The vision tower's transformers config (as a dict) and tensors."""
    if plan.architecture in (ARCHS["hf"], NEXT):
        tower = model.vision.model
        return tower.config.to_dict(), tower.state_dict()
    from mmbridge.interop.fastvlm import efficientnet_config, efficientnet_state_dict

    return efficientnet_config(model.vision).to_dict(), efficientnet_state_dict(model.vision)


def projector_act(proj: nn.Sequential) -> str:
    """transformers' `projector_hidden_act` for the bridge's activation."""
    return "sigmoid" if isinstance(proj[1], nn.Sigmoid) else "gelu"


def llava_state_dict(model, vocab_size: int, tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged model's tensors under LLaVA's (and FastVLM's) names (no copies but the padded rows; an
    EfficientNet cut after an inner block reads the projector's first layer through its head, `fastvlm.cut_projector`)."""
    lm = model.lm
    prefix = lm.base_model_prefix + "."
    state = {f"model.vision_tower.{k}": v for k, v in tower.items()}
    for k, v in lm.state_dict().items():
        if k.startswith(prefix):
            state["model.language_model." + k[len(prefix) :]] = v
        elif k.startswith("lm_head."):
            state[k] = v
        else:
            raise ExportError(f"model.lm.path: the LM holds {k}, which is neither its base model nor its lm_head")
    emb = next(
        f"model.language_model.{n}.weight"
        for n, m in lm.get_decoder().named_modules()
        if m is lm.get_input_embeddings()
    )
    state[emb] = _padded(state[emb], vocab_size)
    state["lm_head.weight"] = _padded(state["lm_head.weight"], vocab_size)
    proj = model.bridge.proj
    for i, name in ((0, "linear_1"), (2, "linear_2")):
        state[f"model.multi_modal_projector.{name}.weight"] = proj[i].weight
        state[f"model.multi_modal_projector.{name}.bias"] = proj[i].bias
    if getattr(model.bridge, "image_newline", None) is not None:  # LLaVA-NeXT's
        state["model.image_newline"] = model.bridge.image_newline
    from mmbridge.interop.fastvlm import cut_block, cut_projector

    if getattr(model.vision, "cfg", {}).get("name") == "efficientnet_lite0" and cut_block(model.vision) is not None:
        state["model.multi_modal_projector.linear_1.weight"] = cut_projector(proj[0].weight.detach())
    return {k: v.detach() for k, v in state.items()}


def llava_model(model, processor, plan: LlavaLayout):
    """A LLaVA (or FastVLM) holding the (LoRA-merged) model's weights; returns it and the new token ids."""
    import transformers

    config_class = getattr(transformers, plan.architecture.replace("ForConditionalGeneration", "Config"))
    model_class = getattr(transformers, plan.architecture)
    vision, tower = _tower(model, plan)
    lm_vocab = int(model.lm.config.vocab_size)
    image_id = processor.image_token_id
    vocab = max(lm_vocab, image_id + 1)
    text = {k: v for k, v in model.lm.config.to_dict().items() if k != "_name_or_path"}
    text["vocab_size"] = vocab
    vision = {k: v for k, v in vision.items() if k != "_name_or_path"}
    next_options = {"image_grid_pinpoints": plan.pinpoints} if plan.pinpoints else {}
    config = config_class(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        image_seq_length=plan.image_seq_length,
        projector_hidden_act=projector_act(model.bridge.proj),
        vision_feature_select_strategy=plan.strategy,
        vision_feature_layer=plan.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(model.lm.config.tie_word_embeddings),
        **next_options,
    )
    config.dtype = next(model.lm.parameters()).dtype
    with torch.device("meta"):  # no random initialisation: every tensor is assigned below
        llava = model_class(config)
    state = llava_state_dict(model, vocab, tower)
    own = set(llava.state_dict())
    if own != set(state):
        raise ExportError(
            f"the {plan.architecture} built from this run's configs expects other tensors: missing "
            f"{sorted(own - set(state))[:5]}, unexpected {sorted(set(state) - own)[:5]}"
        )
    llava.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        llava.tie_weights()
    # buffers that are not saved (position ids, rotary frequencies) come from the models that ran
    buffers = (
        {f"model.vision_tower.{k}": b for k, b in model.vision.model.named_buffers()}
        if plan.architecture in (ARCHS["hf"], NEXT)
        else {}
    )
    prefix = model.lm.base_model_prefix + "."
    buffers.update(
        {"model.language_model." + k[len(prefix) :]: b for k, b in model.lm.named_buffers() if k.startswith(prefix)}
    )
    for name, buf in list(llava.named_buffers()):
        if buf.is_meta and name in buffers:
            owner, _, leaf = name.rpartition(".")
            llava.get_submodule(owner)._buffers[leaf] = buffers[name]
    return llava, list(range(lm_vocab, vocab))


def export_run(run_dir: str | Path, out_dir: str | Path, say=print) -> Path:
    """Write the run as a LlavaForConditionalGeneration (or FastVlmForConditionalGeneration) folder (config,
    safetensors, processor, generation config) that `AutoModelForImageTextToText` and `AutoProcessor` load
    without remote code."""
    from mmbridge.interop.llava_processor import generation_config, llava_processor
    from mmbridge.runs import load_run, read_recipe

    run_dir, out = Path(run_dir), Path(out_dir)
    folders.check_new(out)
    recipe = read_recipe(run_dir)
    if recipe.kind != "lmm":
        raise ExportError(f"{run_dir}: a kind {recipe.kind!r} run trains an encoder, not a multimodal LM")
    blockers = recipe_blockers(recipe.model) + [
        f"stages[{i}].train.lm: {st.train['lm']} adds layers a transformers Llama does not have "
        f"({'MoE experts' if st.train['lm'] == 'moe' else 'LaVIN adapters'})"
        for i, st in enumerate(recipe.stages)
        if st.train.get("lm") in ("moe", "mma")
    ]
    if blockers:  # before any weight is loaded
        raise ExportError(f"{run_dir}: cannot export as LLaVA or FastVLM:\n  " + "\n  ".join(blockers))
    model, processor = load_run(run_dir, device="cpu")
    plan = layout(model, recipe.model)
    merged = merge_lora(model.lm)
    llava, new_ids = llava_model(model, processor, plan)
    stage = folders.staging(out)
    try:
        llava.generation_config = generation_config(processor, new_ids)
        llava.save_pretrained(str(stage.path))
        llava_processor(processor, plan, recipe.model.system_prompt).save_pretrained(str(stage.path))
        (stage.path / "mmbridge_export.json").write_text(
            json.dumps(
                {
                    "format": 1,
                    "run": str(run_dir.resolve()),
                    "class": plan.architecture,
                    "lora_layers_merged": merged,
                    "suppressed_ids": new_ids,
                },
                indent=2,
            )
        )
    except BaseException:
        folders.discard(stage)
        raise
    folders.publish(stage)  # refused: OUT untouched, the finished folder kept and named
    say(
        f"exported {run_dir} as {plan.architecture} to {out} ({merged} LoRA layers merged; "
        f"{plan.image_seq_length} tokens per image, vision_feature_layer {plan.feature_layer}, "
        f"select strategy {plan.strategy})"
    )
    return out
