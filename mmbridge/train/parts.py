"""Which parameters a stage trains: frozen / full / LoRA per part, with a learning rate each."""

from __future__ import annotations

import torch

from mmbridge.config import StageConfig
from mmbridge.models.language import add_lora, lora_layers
from mmbridge.models.mma import (
    VisionAdapter,
    add_mma,
    add_vision_mma,
    has_mma,
    has_vision_mma,
    is_mma_param,
    vision_kind,
)
from mmbridge.models.mmlm import MultimodalLM
from mmbridge.models.moe import GATE_KEYS, add_moe, has_moe, is_moe_param
from mmbridge.models.window_lora import has_window_lora
from mmbridge.registry import TRAIN_MODES


def has_lora(model: MultimodalLM) -> bool:
    return any("lora_" in n for n, _ in model.lm.named_parameters())


def moe_balance_weight(model: MultimodalLM, stage: StageConfig) -> float:
    """The weight of the MoE balancing loss in this stage: `moe.aux_weight` where the stage tunes the experts
    (`train.lm: moe`), else 0 (the experts, kept from an earlier stage, are not balanced again)."""
    lm = getattr(model, "lm", None)
    return stage.moe.aux_weight if stage.train.get("lm") == "moe" and lm is not None and has_moe(lm) else 0.0


class TrainMode:
    """What `train.<part>: <mode>` does to a part: `prepare` adds what the mode trains (the first stage that
    asks; later stages keep it) and may return settings to save, `trains` says which parameters learn."""

    def prepare(self, model: MultimodalLM, part: str, stage: StageConfig) -> dict | None:
        return None

    def trains(self, name: str, stage: StageConfig) -> bool:
        raise NotImplementedError


@TRAIN_MODES.register("frozen")
class Frozen(TrainMode):
    def trains(self, name, stage):
        return False


@TRAIN_MODES.register("full")
class Full(TrainMode):
    def trains(self, name, stage):
        return True


@TRAIN_MODES.register("lora")
class LoRA(TrainMode):
    """The LM: peft LoRA on `lora.target_modules` (in the top `lora.layers` layers); the vision tower: Monkey's
    per-window adapters, which `model.tiling.mode: monkey` adds."""

    def prepare(self, model, part, stage):
        if part == "vision":
            if not has_window_lora(model.vision):
                raise ValueError(
                    f"stage {stage.name!r}: train.vision: lora trains Monkey's per-window adapters; this model "
                    "has none (model.tiling.mode: monkey adds them)"
                )
            return None
        if has_lora(model):
            return None
        injected = {
            "r": stage.lora.r,
            "alpha": stage.lora.alpha,
            "dropout": stage.lora.dropout,
            "target_modules": list(stage.lora.target_modules),
            "layers": lora_layers(stage.lora.layers, model.lm.config.num_hidden_layers),
        }
        add_lora(model.lm, **injected)
        return injected

    def trains(self, name, stage):
        return "lora_" in name


@TRAIN_MODES.register("moe")
class MoETuning(TrainMode):
    """MoE-LLaVA's stage: the chosen FFNs become experts (`moe`), which train with their routers (and, with
    `train_ffn`, every dense FFN)."""

    def prepare(self, model, part, stage):
        if not has_moe(model.lm):
            moe = {
                "experts": stage.moe.experts,
                "top_k": stage.moe.top_k,
                "layers": stage.moe.layers,
                **{k: getattr(stage.moe, k) for k in GATE_KEYS},
            }
            add_moe(model.lm, **moe)  # its layers keep these settings; the run's meta saves them (moe_settings)
        return None

    def trains(self, name, stage):
        return is_moe_param(name, stage.moe.train_ffn)


@TRAIN_MODES.register("mma")
class MixtureOfModalityAdaptation(TrainMode):
    """LaVIN: the LM's adapters, their routers and the modality tokens (and, with `mma.vision`, the ViT's
    adapters, which train while the rest of the tower keeps its mode)."""

    def prepare(self, model, part, stage):
        m = stage.mma
        if not has_mma(model.lm):
            mma = {"dim": m.dim, "temperature": m.temperature, "where": list(m.where), "groups": m.groups}
            add_mma(model.lm, **mma, dropout=m.dropout)  # kept by the modality module (mma_settings)
        if (kind := vision_kind(m.vision)) and not has_vision_mma(model.vision):
            add_vision_mma(model.vision, m.dim, m.groups, m.dropout, kind=kind, temperature=m.temperature)
        return None

    def trains(self, name, stage):
        return is_mma_param(name)


def apply_stage_modes(model: MultimodalLM, stage: StageConfig) -> dict | None:
    """Set `requires_grad` for this stage by each part's train mode (`TRAIN_MODES`), and return the LoRA config
    if one was injected now. Frozen parts keep their normalisation statistics and run without dropout."""
    modes = {"vision": "frozen", "bridge": "frozen", "lm": "frozen", **stage.train}
    chosen = {part: TRAIN_MODES.get(mode)() for part, mode in modes.items()}
    injected = None
    for part, mode in chosen.items():
        injected = mode.prepare(model, part, stage) or injected
    for part, module in model.parts().items():
        for name, p in module.named_parameters():
            p.requires_grad_(chosen[part].trains(name, stage))
        module.train(modes[part] != "frozen")
    if modes["lm"] == "mma":  # LaVIN's vision adapters train in an mma stage; the rest of the tower keeps its mode
        for adapter in (m for m in model.vision.modules() if isinstance(m, VisionAdapter)):
            for p in adapter.trainable():
                p.requires_grad_(True)
            adapter.dropout.train(True)
    return injected


def param_groups(model: MultimodalLM, stage: StageConfig, objective: torch.nn.Module | None = None) -> list[dict]:
    """One AdamW group per training part, each with its own learning rate (no hidden overrides); with
    weight decay, a part's weight matrices and its other parameters (no decay) are two groups.

    Parameters the objective owns (e.g. Croc's prompt pool) form the group `objective`.
    """
    groups = []
    modules = dict(model.parts())
    if objective is not None and any(True for _ in objective.parameters()):
        if "objective" not in stage.lr:
            raise ValueError(f"stage {stage.name!r}: its objective has parameters; set lr.objective")
        modules["objective"] = objective
    for part, module in modules.items():
        params = [p for p in module.parameters() if p.requires_grad]
        if not stage.weight_decay:
            split = [(params, 0.0)]
        else:  # decay weight matrices; biases, norms and single vectors (gates, scales) keep their values
            split = [([p for p in params if p.ndim >= 2], stage.weight_decay), ([p for p in params if p.ndim < 2], 0.0)]
        for chosen, decay in split:
            if chosen:
                groups.append({"name": part, "params": chosen, "lr": float(stage.lr[part]), "weight_decay": decay})
    if not groups:
        raise ValueError(f"stage {stage.name!r}: nothing trains (every part is frozen)")
    return groups


def trainable_keys(model: torch.nn.Module) -> set[str]:
    """Parameters that train, the saved buffers of every module whose own parameters train (a BatchNorm's running
    statistics move with its weights), and the buffers a module names in its `run_buffers` (e.g. a vocabulary)."""
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    saved = model.state_dict(keep_vars=True).keys()  # persistent buffers only
    for prefix, module in model.named_modules():
        names = set(getattr(module, "run_buffers", ()))
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            names |= {b for b, _ in module.named_buffers(recurse=False)}
        keys |= {k for k in (f"{prefix}.{b}" if prefix else b for b in names) if k in saved}
    return keys


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
