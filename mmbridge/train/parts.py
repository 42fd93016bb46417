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


def has_lora(model: MultimodalLM) -> bool:
    return any("lora_" in n for n, _ in model.lm.named_parameters())


def moe_balance_weight(model: MultimodalLM, stage: StageConfig) -> float:
    """The weight of the MoE balancing loss in this stage: `moe.aux_weight` where the stage tunes the experts
    (`train.lm: moe`), else 0 (the experts, kept from an earlier stage, are not balanced again)."""
    lm = getattr(model, "lm", None)
    return stage.moe.aux_weight if stage.train.get("lm") == "moe" and lm is not None and has_moe(lm) else 0.0


def apply_stage_modes(model: MultimodalLM, stage: StageConfig) -> dict | None:
    """Set `requires_grad` for this stage and return the LoRA config if one was injected now.

    `lm: moe` converts the LM's chosen FFNs into experts the first time (MoE-tuning), `lm: mma` adds LaVIN's
    adapters; later stages keep what was added."""
    injected = None
    modes = {"vision": "frozen", "bridge": "frozen", "lm": "frozen", **stage.train}
    if modes["vision"] == "lora" and not has_window_lora(model.vision):
        raise ValueError(
            f"stage {stage.name!r}: train.vision: lora trains Monkey's per-window adapters; this model "
            "has none (model.tiling.mode: monkey adds them)"
        )
    if modes["lm"] == "lora" and not has_lora(model):
        injected = {
            "r": stage.lora.r,
            "alpha": stage.lora.alpha,
            "dropout": stage.lora.dropout,
            "target_modules": list(stage.lora.target_modules),
            "layers": lora_layers(stage.lora.layers, model.lm.config.num_hidden_layers),
        }
        add_lora(model.lm, **injected)
    if modes["lm"] == "moe" and not has_moe(model.lm):
        moe = {
            "experts": stage.moe.experts,
            "top_k": stage.moe.top_k,
            "layers": stage.moe.layers,
            **{k: getattr(stage.moe, k) for k in GATE_KEYS},
        }
        add_moe(model.lm, **moe)  # its layers keep these settings; the run's meta saves them (moe_settings)
    if modes["lm"] == "mma" and not has_mma(model.lm):
        mma = {
            "dim": stage.mma.dim,
            "temperature": stage.mma.temperature,
            "where": list(stage.mma.where),
            "groups": stage.mma.groups,
            "dropout": stage.mma.dropout,
        }
        add_mma(model.lm, **mma)  # kept by the adapters' modality module; the run's meta saves them (mma_settings)
    if modes["lm"] == "mma" and (kind := vision_kind(stage.mma.vision)) and not has_vision_mma(model.vision):
        m = stage.mma
        add_vision_mma(model.vision, m.dim, m.groups, m.dropout, kind=kind, temperature=m.temperature)
    for part, module in model.parts().items():
        mode = modes[part]
        for name, p in module.named_parameters():
            if mode == "full":
                p.requires_grad_(True)
            elif mode == "lora":
                p.requires_grad_("lora_" in name)
            elif mode == "moe":  # the routers and the experts (and, with train_ffn, the dense FFNs)
                p.requires_grad_(is_moe_param(name, stage.moe.train_ffn))
            elif mode == "mma":  # LaVIN: the adapters, their routers and the modality tokens
                p.requires_grad_(is_mma_param(name))
            else:
                p.requires_grad_(False)
        # frozen parts keep their normalisation statistics and run without dropout
        module.train(mode != "frozen")
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
    """Parameters that train, and the buffers a module saves with them (its `run_buffers`, e.g. a vocabulary)."""
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        keys |= {f"{prefix}.{b}" if prefix else b for b in getattr(module, "run_buffers", ())}
    return keys


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
