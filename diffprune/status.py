"""Failure records: a run that failed is written as such, so the workflow goes on and the report
shows the failure instead of a number.

A model folder's ``train.json`` has ``"status": "ok"`` (a trained model) or ``"status": "failed"``
(no weights; ``failure`` says why and ``failed_at_step`` where). Folders written before statuses
existed have none and count as ok.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffprune import io

SUMMARY = "train.json"
OK = "ok"
FAILED = "failed"


def write_failed_model(
    out_dir: str | os.PathLike, *, reason: str, cfg: dict, seed: int, step: int
) -> None:
    """Write `out_dir` atomically as a failed run's model folder: only train.json, no weights."""
    # imported here: diffusion imports diffusers (seconds), which readers of records never need
    from diffprune.diffusion import resolve_config

    cfg = resolve_config(cfg)
    record = {
        "status": FAILED,
        "failure": reason,
        "cfg": cfg,
        "seed": seed,
        "steps": cfg["steps"],
        "failed_at_step": step,
        "code_version": io.code_version(),
    }
    with io.atomic_path(out_dir, directory=True) as tmp:
        io.save_json(tmp / SUMMARY, record)


def failure(record: dict[str, Any]) -> str | None:
    """Why a train.json record is a failed run, or None when it is a trained model."""
    if record.get("status", OK) == OK:
        return None
    return str(record.get("failure", "unknown reason"))


def model_failure(model_dir: str | os.PathLike) -> str | None:
    """Why the model folder is a failed run, or None (also when it has no train.json at all)."""
    path = Path(model_dir) / SUMMARY
    return failure(io.load_json(path)) if path.is_file() else None
