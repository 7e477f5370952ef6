"""The machine a result came from, recorded beside results that are not bitwise reproducible.

float32 training and inference on the CPU run through kernels chosen for the CPU at hand
(oneDNN convolutions, BLAS GEMMs with AVX2 or AVX-512), so the same code, params and inputs give
slightly different weights on another CPU type. Selection avoids that (diffprune.cluster's
float64 path); training cannot afford it, so its sidecars name the machine and the report lists
the machines behind its tables. The spread over seeds is larger than this difference.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import numpy as np

SIMD_PREFIXES = ("avx", "fma", "sse4", "f16c", "amx")


@cache
def describe() -> dict[str, object]:
    """CPU model and SIMD flags, numpy and torch versions, and the CUDA devices torch sees."""
    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if cpu and flags:
                break
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": cpu,
        "cpu_simd": sorted(f for f in flags if f.startswith(SIMD_PREFIXES)),
        "gpus": gpus,
        "numpy": np.__version__,
        "torch": str(torch.__version__),  # TorchVersion would not load with weights_only
    }


def label(info: dict[str, object]) -> str:
    """One line for tables: the GPUs when there are any, else the CPU."""
    gpus = info.get("gpus") or []
    return ", ".join(dict.fromkeys(gpus)) if gpus else str(info.get("cpu", "unknown"))
