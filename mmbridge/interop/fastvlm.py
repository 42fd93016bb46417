"""EfficientNet-Lite0 as transformers' `EfficientNetModel`, the vision tower of `FastVlmForConditionalGeneration`.

transformers' EfficientNet is B0-shaped with squeeze-excite; Lite0 (Tan & Le's mobile variant) has the same
blocks without squeeze-excite and with ReLU6. So the tower is B0 with `hidden_act: relu6` and every
squeeze-excite made an exact identity: its expand convolution has zero weights and a bias of 30, so the
sigmoid gate is 1.0 in fp32 (1 - sigmoid(30) ≈ 9e-14 is below half an ulp of 1.0) and the features are
multiplied by exactly 1. Padding: transformers pads stride-2 depthwise convolutions right/bottom by
k//2 - 1 and k//2 (and the stem by 0/1), which is the Lite package's static "same" padding when every
feature map has an even size, i.e. when the image size is a multiple of 32.
"""

from __future__ import annotations

import torch

SE_BIAS = 30.0  # sigmoid(30) rounds to 1.0 in fp32


def blockers(vision: dict) -> list[str]:
    """What in `model.vision` keeps an EfficientNet-Lite0 encoder from being FastVLM's tower."""
    found = []
    if vision.get("feature_stage", "head") != "head":
        found.append(f"model.vision.feature_stage: {vision['feature_stage']}; FastVLM reads the tower's last "
                     "feature map (feature_stage: head)")
    if vision.get("extra_stages"):
        found.append(f"model.vision.extra_stages: {vision['extra_stages']} appends pooled earlier stages, which "
                     "EfficientNetModel does not; train without extra_stages")
    size = int(vision.get("image_size", 256))
    if size % 32:
        found.append(f"model.vision.image_size: {size} is not a multiple of 32, where transformers' padding "
                     f"differs from the Lite package's; use {size - size % 32} or {size - size % 32 + 32}")
    return found


def efficientnet_config(encoder):
    """The EfficientNetConfig of Lite0 at the encoder's image size (B0 widths and depths, ReLU6)."""
    from transformers import EfficientNetConfig

    return EfficientNetConfig(width_coefficient=1.0, depth_coefficient=1.0, image_size=int(encoder.image_size),
                              hidden_act="relu6", hidden_dim=1280, hidden_size=1280, batch_norm_eps=1e-3,
                              dropout_rate=0.0, drop_connect_rate=0.0)


_BLOCK = {"_expand_conv": "expansion.expand_conv", "_bn0": "expansion.expand_bn",
          "_depthwise_conv": "depthwise_conv.depthwise_conv", "_bn1": "depthwise_conv.depthwise_norm",
          "_project_conv": "projection.project_conv", "_bn2": "projection.project_bn"}
_TOP = {"_conv_stem": "embeddings.convolution", "_bn0": "embeddings.batchnorm", "_conv_head": "encoder.top_conv",
        "_bn1": "encoder.top_bn"}


def efficientnet_state_dict(encoder) -> dict[str, torch.Tensor]:
    """The Lite package's tensors under EfficientNetModel's names, plus identity squeeze-excite weights."""
    state = {}
    for key, value in encoder.model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            state[f"encoder.blocks.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"] = value
        else:
            state[f"{_TOP[parts[0]]}.{parts[1]}"] = value
    config = efficientnet_config(encoder)
    with torch.device("meta"):
        from transformers import EfficientNetModel

        shapes = {k: v.shape for k, v in EfficientNetModel(config).state_dict().items()}
    for key, shape in shapes.items():
        if ".squeeze_excite." in key:
            fill = SE_BIAS if key.endswith("expand.bias") else 0.0
            state[key] = torch.full(shape, fill, dtype=torch.float32)
    return state
