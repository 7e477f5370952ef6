"""Per-sample quantities under fixed, seeded draws: every sample gets its own noise and timestep
from a generator seeded by (seed, sample_id, draw), so a sample's draw does not depend on the
batch size, on the subset it sits in or on the device. Loss records taken at different snapshots
of a surrogate are then comparable, and scores are reproducible (diffprune.surrogate,
diffprune.scores).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffprune.batches import row_batches
from diffprune.data import to_model_input
from diffprune.diffusion import build_scheduler, draw, fixed_timestep, per_sample_loss


@dataclass(frozen=True)
class Draws:
    """How a score draws and batches its per-sample (noise, t): one value passed down every layer.

    seed, draw_index: sample i's draw is seeded by (seed, sample_id, draw_index). timestep: a
    DDPM-style index fixing t for every sample (None: t is drawn). batch_size, num_workers: the
    batches and their loader processes (the draws do not depend on them). progress: a bar.
    """

    seed: int = 0
    draw_index: int = 0
    timestep: int | None = None
    batch_size: int = 256
    num_workers: int = 0
    progress: bool = False

    def with_(self, **changes: Any) -> Draws:
        """A copy with some fields changed (dataclasses.replace)."""
        return replace(self, **changes)


def fixed_draws(
    x0: torch.Tensor,
    sample_ids: np.ndarray,
    scheduler: Any,
    *,
    seed: int,
    draw_index: int = 0,
    timestep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and timestep for each sample of a CPU batch, seeded by (seed, sample_id, draw_index).

    `timestep` (a DDPM-style index, see diffusion.fixed_timestep) replaces the drawn t by one fixed
    value for every sample (the reference's t = 15 of 1000 for EL2N and GraNd); the noise is still
    per sample and the same as without it.
    """
    noises, steps = [], []
    for i, sample_id in enumerate(sample_ids):
        state = np.random.SeedSequence([seed, int(sample_id), draw_index]).generate_state(
            1, np.uint64
        )
        generator = torch.Generator().manual_seed(int(state[0]))
        noise, t = draw(x0[i : i + 1], scheduler, generator=generator)
        noises.append(noise)
        steps.append(t)
    noise, t = torch.cat(noises), torch.cat(steps)
    if timestep is not None:
        t = torch.full_like(t, fixed_timestep(scheduler, timestep))
    return noise, t


def batches(
    images: np.ndarray,
    *,
    resolution: int,
    scheduler: Any,
    sample_ids: np.ndarray,
    seed: int,
    draw_index: int = 0,
    timestep: int | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "",
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (rows, x0, noise, t) on `device` for consecutive batches of uint8 NHWC images.

    The images are read (a memory map: one batch at a time) and turned into x0 by
    diffprune.batches.row_batches, in `num_workers` loader processes; the batches are the same
    for any number."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(sample_ids) != len(images):
        raise ValueError(f"{len(sample_ids)} sample_ids for {len(images)} images; need one each")
    device = torch.device(device)
    inputs = row_batches(
        images,
        batch_size,
        transform=partial(to_model_input, resolution=resolution),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for rows, x0 in inputs:
            noise, t = fixed_draws(
                x0, sample_ids[rows], scheduler, seed=seed, draw_index=draw_index, timestep=timestep
            )
            yield rows, x0.to(device, non_blocking=True), noise.to(device), t.to(device)
            bar.update(rows.stop - rows.start)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def scoring_batches(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    cfg: dict,
    scheduler: Any,
    draws: Draws,
    sample_ids: np.ndarray | None = None,
    desc: str = "",
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`batches` for scoring `model`: on its device, in eval mode and float32 (autocast off),
    with the fixed per-sample `draws`; the model's mode is restored afterwards."""
    sample_ids = np.arange(len(images)) if sample_ids is None else np.asarray(sample_ids)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            yield from batches(
                images,
                resolution=cfg["resolution"],
                scheduler=scheduler,
                sample_ids=sample_ids,
                seed=draws.seed,
                draw_index=draws.draw_index,
                timestep=draws.timestep,
                batch_size=draws.batch_size,
                device=device,
                num_workers=draws.num_workers,
                progress=draws.progress,
                desc=desc,
            )
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_losses(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    cfg: dict,
    sample_ids: np.ndarray | None = None,
    seed: int = 0,
    draw_index: int = 0,
    timestep: int | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Per-sample diffusion loss (float64, (N,)) of `model` under the fixed per-sample draws.

    `cfg` is the train config the model was built from (objective, resolution, scheduler).
    Runs on the model's device, in float32 (autocast off), in eval mode; restores the mode after.
    """
    draws = Draws(seed, draw_index, timestep, batch_size, num_workers, progress)
    return losses_under(model, images, cfg=cfg, draws=draws, sample_ids=sample_ids)


@torch.no_grad()
def losses_under(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    cfg: dict,
    draws: Draws,
    sample_ids: np.ndarray | None = None,
) -> np.ndarray:
    """`sample_losses` with its draws as one value."""
    scheduler = build_scheduler(cfg)
    out = np.empty(len(images), dtype=np.float64)
    for rows, x0, noise, t in scoring_batches(
        model, images, cfg=cfg, scheduler=scheduler, draws=draws, sample_ids=sample_ids,
        desc="losses",
    ):  # fmt: skip
        loss = per_sample_loss(
            model, scheduler, x0, noise=noise, timesteps=t, objective=cfg["objective"]
        )
        out[rows] = loss.double().cpu().numpy()
    return out
