"""A trained diffusion model's folder: diffusers' pipeline layout plus train.json, written once
by diffprune.train and read by sampling and scoring."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffprune import io
from diffprune.diffusion import MODELS, disable_label_dropout, resolve_config, scheduler_class
from diffprune.errors import DataError
from diffprune.status import SUMMARY, model_failure


def save_model(
    model: torch.nn.Module,
    scheduler,
    out_dir: str | os.PathLike,
    *,
    cfg: dict,
    summary: dict[str, Any] | None = None,
) -> None:
    """Write a model folder atomically: diffusers' pipeline layout (``unet/`` or
    ``transformer/``, ``scheduler/``) plus train.json (cfg + summary).

    A UNet trained with DDPM is saved by ``DDPMPipeline.save_pretrained`` itself; other
    combinations get the same layout (``<component>/``, ``scheduler/``) without model_index.json.
    """
    cfg = resolve_config(cfg)
    with io.atomic_path(out_dir, directory=True) as tmp:
        if isinstance(model, UNet2DModel) and isinstance(scheduler, DDPMScheduler):
            DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(tmp)
        else:
            model.save_pretrained(tmp / MODELS[cfg["model"]].subfolder)
            scheduler.save_pretrained(tmp / "scheduler")
        io.save_json(tmp / SUMMARY, {**(summary or {}), "cfg": cfg})


def load_model(model_dir: str | os.PathLike) -> tuple[torch.nn.Module, Any, dict]:
    """(model in eval mode on the CPU, scheduler, train cfg) from a folder written by `train`;
    a failed run's folder (diffprune.status.write_failed_model) is refused."""
    model_dir = Path(model_dir)
    if not (model_dir / SUMMARY).is_file():
        raise DataError(
            f"{model_dir} is not a trained model folder (no {SUMMARY}); run train first"
        )
    reason = model_failure(model_dir)
    if reason is not None:
        raise DataError(f"{model_dir} holds no model: its training run failed: {reason}")
    cfg = resolve_config(io.load_json(model_dir / SUMMARY)["cfg"])
    spec = MODELS[cfg["model"]]
    model = disable_label_dropout(spec.cls.from_pretrained(model_dir, subfolder=spec.subfolder))
    scheduler = scheduler_class(cfg["objective"]).from_pretrained(model_dir, subfolder="scheduler")
    return model.eval(), scheduler, cfg
