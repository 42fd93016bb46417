"""Where a run computes: the recipe key `device` and the `--device` flag of train, eval, chat and demo.

`auto` (the default) is `cuda:LOCAL_RANK` when CUDA is available and the CPU otherwise; `cpu`, `cuda`
(`cuda:LOCAL_RANK`, so one flag serves every process under torchrun) and `cuda:N` pick one
explicitly, and an asked-for device that is absent is an error naming the flag, never a silent CPU run.
The device is picked once; the model, every batch, generation and evaluation then live on it.
"""

from __future__ import annotations

import os

import torch

from mmbridge.core import DeviceError, check_spec  # noqa: F401  (DeviceError: also imported from here)


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is built without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "no CUDA device is visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device for `spec`; under torchrun `auto` and `cuda` give this process's `cuda:LOCAL_RANK`."""
    spec = check_spec(spec)
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    flag = f"--device {spec} (recipe key `device`)"
    if not torch.cuda.is_available():
        raise DeviceError(f"{flag}: CUDA is not available here: {_why_no_cuda()}; use --device cpu or auto")
    if spec in ("auto", "cuda"):
        index = local_rank
    else:
        index = int(spec.split(":")[1])
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise DeviceError(
                f"{flag}: under torchrun every process uses its own cuda:LOCAL_RANK; "
                "use --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES"
            )
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"{flag}: cuda:{index} does not exist; this machine shows {count} CUDA device(s)"
            f" (cuda:0 … cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def allow_tf32(device: torch.device, precision: str) -> None:
    """On a GPU, let fp32 matmuls and convolutions use TF32 unless the recipe asked for strict `fp32`."""
    if device.type == "cuda" and precision != "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
