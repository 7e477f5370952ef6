"""Logging and thread setup shared by the workflow's thin scripts."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def setup(log_path: str | os.PathLike | None = None, *, threads: int | None = None) -> None:
    """Log INFO to stderr and to the rule's log file; pin torch to the job's thread count."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    if threads:
        import torch
        from threadpoolctl import threadpool_limits

        # numpy's BLAS would otherwise use every core, also when jobs share the machine
        threadpool_limits(threads)
        torch.set_num_threads(threads)


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """Measure wall seconds of a block: `with stopwatch() as t: ...; t["seconds"]`."""
    timing = {"seconds": 0.0}
    start = time.perf_counter()
    try:
        yield timing
    finally:
        timing["seconds"] = time.perf_counter() - start
