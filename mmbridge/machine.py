"""What this process runs on, for a bug report or a CI log: processor, cores, torch and the math libraries whose
kernels decide float rounding (`mmbridge env`)."""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

# Environment variables that choose other kernels, and so other rounding, on the same processor.
KERNEL_VARS = (
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUBLAS_WORKSPACE_CONFIG",
    "NVIDIA_TF32_OVERRIDE",
)


# Instruction sets that decide which kernels MKL, oneDNN and ATen pick.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "asimd", "sve")


def cpu_model() -> str:
    """The processor: name, vendor, family/model/stepping and its SIMD sets (Linux: /proc/cpuinfo; elsewhere
    what `platform` knows). Virtual machines often hide the name, so the numbers and flags say what it is."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return platform.processor() or platform.machine()
    fields = {}
    for line in info.read_text(errors="replace").splitlines():
        if not line.strip():
            break  # the first processor is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    name = fields.get("model name") or fields.get("Model") or platform.machine()
    ids = "/".join(fields[k] for k in ("cpu family", "model", "stepping") if k in fields)
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    parts = [
        name,
        fields.get("vendor_id", ""),
        f"family/model/stepping {ids}" if ids else "",
        " ".join(f for f in ISA_FLAGS if f in flags),
    ]
    return "; ".join(p for p in parts if p)


def describe() -> dict:
    """The machine and software as one flat dict of strings and numbers."""
    import torch

    config = torch.__config__.show()

    def found(pattern: str) -> str | None:
        hit = re.search(pattern, config)
        return hit.group(1) if hit else None

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "blas": found(r"BLAS_INFO=(\w+)"),
        "mkl": found(r"Math Kernel Library Version ([\w.]+)"),
        "onednn": found(r"MKL-DNN v([\d.]+)"),
        "cuda": None,
    }
    if torch.cuda.is_available():
        out["cuda"] = f"{torch.version.cuda}: " + ", ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        )
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    out.update({k: os.environ[k] for k in KERNEL_VARS if k in os.environ})
    return out


def report() -> str:
    return "\n".join(f"{k:>16}: {v}" for k, v in describe().items())


if __name__ == "__main__":
    print(report())
