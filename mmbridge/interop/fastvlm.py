"""EfficientNet-Lite0 as transformers' `EfficientNetModel`, the vision tower of `FastVlmForConditionalGeneration`.

transformers' EfficientNet is B0-shaped with squeeze-excite; Lite0 (Tan & Le's mobile variant) has the same
blocks without squeeze-excite and with ReLU6. So the tower is B0 with `hidden_act: relu6` and every
squeeze-excite made an exact identity: its expand convolution has zero weights and a bias of 30, so the
sigmoid gate is 1.0 in fp32 (1 - sigmoid(30) ≈ 9e-14 is below half an ulp of 1.0) and the features are
multiplied by exactly 1. Padding: transformers pads stride-2 depthwise convolutions right/bottom by
k//2 - 1 and k//2 (and the stem by 0/1), which is the Lite package's static "same" padding when every
feature map has an even size, i.e. when the image size is a multiple of 32.

An encoder cut after an inner block (`feature_stage: blockN`) is the same config with the later blocks
left out, but `EfficientNetModel` always ends in a 1×1 convolution to 1280 channels, BatchNorm and ReLU6.
That head is made to pass the block's features on unchanged: each of the C channels x is spread over
P = 1280 // C ReLU6 pieces, half for its positive and half for its negative side, piece k of a side
relu6(±s·x − 6k); a side's pieces sum to max(±s·x, 0) exactly while |s·x| ≤ 3P. The projector's first
Linear, which reads the pieces, takes the weight of x divided by ±s on each. Zero stays zero and no large
constant cancels, so the projector's sums round as the unsplit ones do. `CUT_RANGE` is the covered |x|
(features beyond it are clipped in the exported tower only; the world's images reach about 47).
"""

from __future__ import annotations

import torch

SE_BIAS = 30.0  # sigmoid(30) rounds to 1.0 in fp32
STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)  # MBConv blocks per stage (B0 and Lite0 alike)
CUT_RANGE = 384.0  # |feature| an inner-block cut's exported head passes on unchanged (see the module doc)


def blockers(vision: dict) -> list[str]:
    """What in `model.vision` keeps an EfficientNet-Lite0 encoder from being FastVLM's tower."""
    found = []
    stage = vision.get("feature_stage", "head")
    if stage != "head" and not (stage.startswith("block") and stage[5:].isdigit() and 0 <= int(stage[5:]) < 15):
        found.append(
            f"model.vision.feature_stage: {stage}; FastVLM reads the tower's last feature map (the "
            "head, or an inner block's cut: block0 to block14)"
        )
    if vision.get("extra_stages"):
        found.append(
            f"model.vision.extra_stages: {vision['extra_stages']} appends pooled earlier stages, which "
            "EfficientNetModel does not; train without extra_stages"
        )
    size = int(vision.get("image_size", 256))
    if size % 32:
        found.append(
            f"model.vision.image_size: {size} is not a multiple of 32, where transformers' padding "
            f"differs from the Lite package's; use {size - size % 32} or {size - size % 32 + 32}"
        )
    return found


def cut_block(encoder) -> int | None:
    """The last MBConv block an inner-block cut keeps (None: the whole network and its head)."""
    stage = getattr(encoder, "feature_stage", "head")
    return None if stage == "head" else int(stage[5:])


def efficientnet_config(encoder):
    """The EfficientNetConfig of Lite0 at the encoder's image size (B0 widths and depths, ReLU6); for an inner
    block's cut, the stages up to that block."""
    from transformers import EfficientNetConfig

    config = EfficientNetConfig(
        width_coefficient=1.0,
        depth_coefficient=1.0,
        image_size=int(encoder.image_size),
        hidden_act="relu6",
        hidden_dim=1280,
        hidden_size=1280,
        batch_norm_eps=1e-3,
        dropout_rate=0.0,
        drop_connect_rate=0.0,
    )
    last = cut_block(encoder)
    if last is not None:
        ends = [sum(STAGE_REPEATS[: i + 1]) for i in range(len(STAGE_REPEATS))]
        stage = next(i for i, end in enumerate(ends) if end > last)
        repeats = list(STAGE_REPEATS[: stage + 1])
        repeats[-1] = last + 1 - (ends[stage - 1] if stage else 0)
        for key in ("kernel_sizes", "in_channels", "out_channels", "strides", "expand_ratios"):
            setattr(config, key, list(getattr(config, key))[: stage + 1])
        config.num_block_repeats = repeats
    return config


def _pieces(channels: int):
    """The ReLU6 pieces of an inner-block cut: each head channel's feature, side (+1 / −1), piece index, and the
    scale s (see the module doc)."""
    half = 1280 // channels // 2  # pieces per side of a channel
    if half < 1:
        raise ValueError(f"a cut with {channels} channels leaves no room for its pieces in 1280 channels")
    rows = torch.arange(channels * 2 * half)
    sign = 1.0 - 2.0 * ((rows // half) % 2).float()  # +1: the positive side, −1: the negative one
    return rows, rows // (2 * half), sign, rows % half, 6.0 * half / CUT_RANGE  # s: 0.125 for 80 channels


def cut_head(channels: int) -> dict[str, torch.Tensor]:
    """The stock head's tensors that spread `channels` features over ReLU6 pieces (see the module doc)."""
    rows, channel, sign, k, scale = _pieces(channels)
    conv = torch.zeros(1280, channels, 1, 1)
    conv[rows, channel, 0, 0] = sign * scale
    bias = torch.zeros(1280)
    bias[rows] = -6.0 * k.float()
    # BatchNorm in eval: (x − 0) / sqrt(1 + eps) · w + b, with w = sqrt(1 + eps) taken in fp32 as it runs
    norm = torch.sqrt(torch.tensor(1.0 + 1e-3))
    return {
        "encoder.top_conv.weight": conv,
        "encoder.top_bn.weight": norm.expand(1280).clone(),
        "encoder.top_bn.bias": bias,
        "encoder.top_bn.running_mean": torch.zeros(1280),
        "encoder.top_bn.running_var": torch.ones(1280),
        "encoder.top_bn.num_batches_tracked": torch.tensor(0),
    }


def cut_projector(linear_1_weight: torch.Tensor) -> torch.Tensor:
    """The projector's first Linear weight rewritten to read the pieces of its input features (its bias stays)."""
    rows, channel, sign, _, scale = _pieces(linear_1_weight.shape[1])
    weight = torch.zeros(linear_1_weight.shape[0], 1280, dtype=linear_1_weight.dtype)
    weight[:, rows] = linear_1_weight[:, channel] * (sign / scale).to(linear_1_weight.dtype)
    return weight


_BLOCK = {
    "_expand_conv": "expansion.expand_conv",
    "_bn0": "expansion.expand_bn",
    "_depthwise_conv": "depthwise_conv.depthwise_conv",
    "_bn1": "depthwise_conv.depthwise_norm",
    "_project_conv": "projection.project_conv",
    "_bn2": "projection.project_bn",
}
_TOP = {
    "_conv_stem": "embeddings.convolution",
    "_bn0": "embeddings.batchnorm",
    "_conv_head": "encoder.top_conv",
    "_bn1": "encoder.top_bn",
}


def efficientnet_state_dict(encoder) -> dict[str, torch.Tensor]:
    """The Lite package's tensors under EfficientNetModel's names, plus identity squeeze-excite weights."""
    state = {}
    if cut_block(encoder) is not None:  # the head that passes the cut's features on
        state.update(cut_head(int(encoder.hidden_size)))
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
