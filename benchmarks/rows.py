"""What every benchmark shares: best-of timing, the machine it ran on, and the row it returns.

A row compares one measured `value` with a `baseline_value` measured in the same run on the same
machine; `ratio` is baseline / value for times ("how many times faster"), value / baseline for
rates.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

ROW_KEYS = ("benchmark", "baseline", "value", "baseline_value", "unit", "ratio", "machine", "notes")
#: Units where a higher value is better; for all others (seconds) lower is better.
RATES = ("images/s", "samples/s")


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time of `repeats` calls (seconds) and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """numpy's BLAS and torch on one thread, as a `threads: 1` workflow job runs."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def row(
    benchmark: str, *, baseline: str, value: float, baseline_value: float, unit: str, notes: str
) -> dict[str, Any]:
    """One table row; `machine` is filled in by benchmarks/run.py."""
    ratio = value / baseline_value if unit in RATES else baseline_value / value
    return {
        "benchmark": benchmark,
        "baseline": baseline,
        "value": value,
        "baseline_value": baseline_value,
        "unit": unit,
        "ratio": ratio,
        "notes": notes,
    }


def machine() -> dict[str, Any]:
    """diffprune's machine record (CPU, SIMD, GPUs, numpy, torch, faiss) plus what a timing
    depends on here: cores and torch threads. The `machine` of each row."""
    import torch

    from diffprune.cluster import machine as described

    info = described()
    return {
        **info,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "gpu": info["gpus"][0] if info["gpus"] else None,
    }


def machine_label(info: dict[str, Any]) -> str:
    gpu = info["gpu"] or "no GPU"
    return (
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, faiss {info['faiss']}, {gpu}"
    )
