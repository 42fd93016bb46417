"""Model FLOPs of a training step and the device's peak, for MFU (model FLOPs utilisation).

Model FLOPs count the matrix products the model needs, not what the kernels happen to execute
(no recomputation from gradient checkpointing, no padding). A product of a token with a weight
matrix [in, out] costs 2·in·out forward; its backward costs the same again for the gradient of the
input (needed whenever a trainable part lies below it) and again for the gradient of the weight
(only if the weight trains). So per micro-batch:

    LM linears     Σ_tokens Σ_linear 2·in·out · (3 if the weight trains else 2)      (LoRA A/B included)
    LM attention   Σ_layers Σ_samples 4·L²·(heads·head_dim) · 3                     (QKᵀ and AV; full L², as PaLM)
                   (both · 1 in the layers below the first that trains, when nothing below them trains either:
                   autograd records no graph there, e.g. LoRA in the top layers with the bridge frozen)
    LM head        n_targets · 2·width·vocab · (3 if it trains else 2)               (logits at targets only)
    vision         n_images · F_vision · (3 if it trains else 1)                     (frozen: run without grad)
                   (UHD's views, encoded at their own sizes: F_vision and F_bridge measured per size)
    bridge         n_images · F_bridge · (3 if it trains, 2 if the vision trains, else 1)

where tokens and sample lengths L exclude padding (packed rows: L per sample, from position ids),
and F_vision, F_bridge are the forward FLOPs of one image, measured once with
`torch.utils.flop_counter` (convolutions, matmuls, attention). The gradient through the lowest
trainable layer is counted for all its linears (a slight over-count for LoRA-only stages). Extra heads of
objectives other than `lm` (Croc, BLIP-2) are not counted; an instruction-aware Q-Former is counted for a
16-token instruction.

The peak: a GPU's dense bf16 peak from its datasheet, matched by the exact device name (an unknown GPU
gets no MFU); on CPU a measured fp32 matmul peak (2048², best of several runs) at the current thread count, cached in
`~/.cache/mmbridge/peak_flops.json`.
"""

from __future__ import annotations

import functools
import json
import platform
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from mmbridge.data.processor import IGNORE
from mmbridge.models.moe import moe_layers
from mmbridge.models.window_lora import has_window_lora
from mmbridge.models.window_lora import mark as mark_windows

# Dense bf16 peaks (no sparsity) from the vendors' datasheets, FLOP/s, by the exact name CUDA reports
# (`torch.cuda.get_device_name`). A GPU not listed gets no MFU rather than a guessed one.
GPU_BF16_PEAK = {
    "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.0e12,
    "NVIDIA H100 NVL": 835.0e12,
    "NVIDIA H200": 989.4e12,  # H200 SXM
    "NVIDIA H200 NVL": 835.0e12,
    "NVIDIA GH200 480GB": 989.4e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362.05e12,
    "NVIDIA L4": 121.0e12,
    "NVIDIA A10": 125.0e12,
}


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


# fused attention on CPU, which torch's counter leaves out
_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *args, out_shape=None, **kwargs: (
        sdpa_flop_count(q, k, v)
    )
}


def forward_flops(fn, *args) -> int:
    """Forward FLOPs of `fn(*args)` as `torch.utils.flop_counter` counts them (run without grad)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def segment_lengths(batch: dict) -> list[int]:
    """Non-padding length of every sample: rows, or the samples packed in a row (a position id of 0
    starts one), in row-major order; computed without a Python loop over rows (it runs every step)."""
    mask = batch.get("attention_mask")
    valid = mask.bool() if mask is not None and mask.dim() == 2 else torch.ones_like(batch["input_ids"]).bool()
    pos = batch.get("position_ids")
    if pos is None:
        return valid.sum(1).tolist()
    starts = (pos == 0) & valid
    starts[:, 0] |= valid[:, 0]  # a row's first real token starts a sample even without a 0 position
    per_row = starts.sum(1)
    offset = per_row.cumsum(0) - per_row  # global number of the first sample of each row
    sample = (starts.long().cumsum(1) - 1 + offset[:, None])[valid]
    return torch.bincount(sample, minlength=int(per_row.sum())).tolist()


class StepFlops:
    """Model FLOPs of one micro-batch, forward + backward, for a model with this stage's `requires_grad`.

    Build it after the stage's modes are set and before the model is wrapped or sharded.
    """

    def __init__(self, model: nn.Module):
        lm, cfg = model.lm, model.lm.config
        text = getattr(cfg, "text_config", cfg)
        # MoE-tuning: a token goes through top_k of an MoE layer's experts, not all of them
        share = {id(lin): m.top_k / m.num_experts for m in moe_layers(lm) for lin in m.experts.modules()}
        bridge = getattr(model, "bridge", None)  # LCL's model has none: its ViT's pooling feeds the LM
        vision_trains, bridge_trains = _trains(model.vision), bridge is not None and _trains(bridge)
        decoder = lm.get_decoder()
        layers = list(getattr(decoder, "layers", []))
        first = 0  # layers below the first trainable one run forward only when nothing below them trains
        if layers and not (vision_trains or bridge_trains or lm.get_input_embeddings().weight.requires_grad):
            first = next((i for i, layer in enumerate(layers) if _trains(layer)), 0)  # none trains: as before
        below = {id(m) for layer in layers[:first] for m in layer.modules()}

        def factor(m: nn.Linear) -> int:
            return 1 if id(m) in below else 3 if m.weight.requires_grad else 2

        self.linear = int(
            sum(
                2 * m.in_features * m.out_features * factor(m) * share.get(id(m), 1)
                for m in decoder.modules()
                if isinstance(m, nn.Linear)
            )
        )
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        passes = 3 * text.num_hidden_layers - 2 * first  # forward + backward above `first`, forward below
        self.attention = 4 * passes * heads * head_dim  # per sample, times L²
        head = lm.get_output_embeddings()
        self.head = 2 * head.in_features * head.out_features * (3 if head.weight.requires_grad else 2)
        self.image = 0  # FLOPs per image: vision encoder and bridge, forward and backward
        self.factors = (3 if vision_trains else 1, 3 if bridge_trains else 2 if vision_trains else 1)
        tiling = getattr(model, "tiling", None)
        # UHD's views have their own sizes: each size is measured when a batch first holds it
        self._own_sizes = model if tiling is not None and tiling.own_sizes else None
        self._per_size: dict[tuple[int, int], int] = {}
        size = getattr(model.vision, "image_size", None) or getattr(
            getattr(model.vision, "config", None), "image_size", None
        )
        if size:
            vision, bridge = self._per_image(model, (size, size))
            if getattr(model, "feature_cache", None) is not None and not vision_trains:
                vision = 0  # a frozen encoder's outputs come from the cache (all but an image's first time)
            self.image = vision * self.factors[0] + bridge * self.factors[1]

    @staticmethod
    def _per_image(model: nn.Module, size: int | tuple[int, int], any_size: bool = False) -> tuple[int, int]:
        """Forward FLOPs of the vision encoder and of the bridge for one S×S or (height, width) image (`any_size`:
        encoded at its own size), in eval mode (no running statistics updated) and without touching the RNG."""
        size = (size, size) if isinstance(size, int) else tuple(size)
        modes = {m: m.training for m in model.modules()}
        grads = {p: p.requires_grad for p in model.parameters()}  # none: no parameter views that need a grad_fn
        weight = next(model.vision.parameters())
        pixels = torch.zeros(1, 3, *size, dtype=weight.dtype, device=weight.device)
        encode = model.vision.forward_any if any_size else model.vision
        if has_window_lora(model.vision):  # Monkey: one view through a window's adapter
            mark_windows(model.vision, torch.zeros(1, dtype=torch.long, device=weight.device))
        bridge = getattr(model, "bridge", None)
        try:
            with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
                model.eval().requires_grad_(False)
                vision = forward_flops(encode, pixels)
                if bridge is None:
                    return vision, 0
                with torch.no_grad():
                    feats = encode(pixels)
                # InstructBLIP's Q-Former also reads the instruction: counted for a nominal 16 tokens
                extra = (
                    {"instruction_ids": torch.ones(1, 16, dtype=torch.long, device=weight.device)}
                    if getattr(bridge, "uses_instruction", False)
                    else {}
                )
                if getattr(bridge, "reads_words", False):  # concept tokens read the LM's word embeddings
                    extra["words"] = model.lm.get_input_embeddings().weight
                if any_size and getattr(bridge, "reads_grid", False):  # a view's own grid (UHD's qwen compressor)
                    patch = model.vision.image_size // model.vision.grid[1]
                    extra["grid"] = (size[0] // patch, size[1] // patch)
                return vision, forward_flops(functools.partial(bridge, **extra), feats)
        finally:
            for m, mode in modes.items():
                m.training = mode
            for p, flag in grads.items():
                p.requires_grad_(flag)

    def images_only(self) -> None:
        """Count the images' encoder and bridge only: for an objective that runs no LM pass."""
        self.linear = self.attention = self.head = 0

    def __call__(self, batch: dict) -> int:
        lengths = segment_lengths(batch)
        targets = int((batch["labels"][:, 1:] != IGNORE).sum())
        pixels = batch.get("pixel_values")
        n_images = pixels.shape[0] if pixels is not None else 0
        sizes = batch.get("view_sizes")
        images = (
            n_images * self.image
            if sizes is None or self._own_sizes is None
            else sum(self._view(tuple(hw)) for hw in sizes.tolist())
        )
        return int(
            sum(lengths) * self.linear + sum(x * x for x in lengths) * self.attention + targets * self.head + images
        )

    def _view(self, size: tuple[int, int]) -> int:
        """FLOPs, forward and backward, of one view of its own (height, width), measured once per size."""
        if size not in self._per_size:
            vision, bridge = self._per_image(self._own_sizes, size, any_size=True)
            self._per_size[size] = vision * self.factors[0] + bridge * self.factors[1]
        return self._per_size[size]


# -- peak -----------------------------------------------------------------------------------------
def measure_matmul_peak(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 6
) -> float:
    """Best FLOP/s of an n x n matmul over `reps` timed runs (after a warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_peak(threads: int | None = None, refresh: bool = False) -> float:
    """The measured fp32 matmul peak of this CPU at `threads` (default: torch's current count), cached.

    `refresh` measures again and keeps the higher figure: a CPU busy with other work measures low, and a
    low peak would overstate MFU."""
    from mmbridge.models.language import cache_root

    threads = threads or torch.get_num_threads()
    key = f"{_cpu_name()} | {threads} threads | torch {torch.__version__}"
    path = cache_root() / "peak_flops.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache and not refresh:
        return float(cache[key])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peak = measure_matmul_peak("cpu", torch.float32)
    finally:
        torch.set_num_threads(before)
    cache[key] = peak = max(peak, float(cache.get(key, 0.0)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=2))
    except OSError:
        pass
    return peak


def gpu_peak(name: str) -> float | None:
    """The dense bf16 datasheet peak of the GPU CUDA calls `name`, or None if it is not in the table."""
    return GPU_BF16_PEAK.get(name.strip())


def device_peak(device: torch.device | str = "cpu") -> tuple[float | None, str]:
    """(peak FLOP/s, how it was found) for the device training runs on; (None, why) for a GPU whose
    datasheet peak this project does not know (then no MFU is shown)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name)
        if peak is None:
            return None, f"{name}: no datasheet peak known (add it to GPU_BF16_PEAK in mmbridge/train/flops.py)"
        return peak, f"{name} dense bf16 datasheet peak"
    return cpu_peak(), f"measured fp32 matmul peak, {torch.get_num_threads()} thread(s)"
