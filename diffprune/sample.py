"""Generate images from a trained model folder, and write a PNG mosaic of them.

DDPM models sample with DDIM (eta 0, deterministic given the initial noise); flow-matching models
with Euler steps on the ODE dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data) on a uniform grid.
All initial noise is drawn at once from a CPU generator seeded with `seed`, so the samples do not
depend on the device's RNG or on `batch_size`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image
from tqdm.auto import tqdm

from diffprune import io
from diffprune.data import to_uint8
from diffprune.device import resolve_device
from diffprune.train import load_model

log = logging.getLogger(__name__)


def generate(
    model_dir: str | os.PathLike,
    *,
    num_samples: int,
    steps: int = 50,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> np.ndarray:
    """`num_samples` images as uint8 (N, H, W, C) from the EMA weights in `model_dir`."""
    for name, value in (("num_samples", num_samples), ("steps", steps), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    model, scheduler, cfg = load_model(model_dir)
    device = resolve_device(device)
    model.to(device)
    size = model.config.sample_size
    shape = (num_samples, model.config.in_channels, size, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    denoise = _ddim if cfg["objective"] == "ddpm" else _euler
    out = []
    for start in tqdm(range(0, num_samples, batch_size), desc="sample", disable=not progress):
        x = noise[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = denoise(model, scheduler, x, steps=steps)
        out.append(to_uint8(x.float().cpu()))
    log.info("%d samples from %s (%s, %d steps)", num_samples, model_dir, cfg["objective"], steps)
    return np.concatenate(out)


@torch.no_grad()
def _ddim(model, scheduler, x: torch.Tensor, *, steps: int) -> torch.Tensor:
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    for t in ddim.timesteps:
        eps = model(x, t).sample
        x = ddim.step(eps.float(), t, x, eta=0.0).prev_sample
    return x


@torch.no_grad()
def _euler(model, scheduler, x: torch.Tensor, *, steps: int) -> torch.Tensor:
    times = torch.linspace(0.0, 1.0, steps + 1, device=x.device)
    for t, t_next in itertools.pairwise(times):
        velocity = model(x, scheduler.timestep_input(t)).sample
        x = x + (t_next - t) * velocity.float()
    return x


def save_grid(images_uint8_nhwc: np.ndarray, path: str | os.PathLike, *, nrow: int = 8) -> None:
    """A PNG mosaic of the images, `nrow` per row, 2-pixel black gaps; written atomically."""
    images = np.asarray(images_uint8_nhwc)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0 or nrow < 1:
        raise ValueError(
            f"save_grid needs uint8 images (N,H,W,C) with N >= 1 and nrow >= 1, "
            f"got {images.dtype}{images.shape} and nrow={nrow}"
        )
    n, h, w, c = images.shape
    cols, rows, pad = min(nrow, n), math.ceil(n / nrow), 2
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[top : top + h, left : left + w] = image
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    with io.atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
