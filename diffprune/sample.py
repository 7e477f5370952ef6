"""Generate images from a trained model folder, and write a PNG mosaic of them.

DDPM models sample with DDIM (eta 0, deterministic given the initial noise); flow-matching models
with Euler steps on the ODE dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data) on a uniform grid.
All initial noise is drawn at once from a CPU generator seeded with `seed`, so the samples do not
depend on the device's RNG or on `batch_size`.

A failed run (a failed model folder, or samples with non-finite values) gets no samples:
`write_samples` writes an empty array and a grid that reads FAILED, so the workflow goes on and
evaluation refuses the run.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from diffprune import io
from diffprune.data import to_uint8
from diffprune.device import resolve_device
from diffprune.diffusion import MODELS, resolve_config
from diffprune.errors import SamplingFailed
from diffprune.status import SUMMARY, model_failure
from diffprune.train import load_model

log = logging.getLogger(__name__)

FAILED_TEXT = "FAILED"


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
    """`num_samples` images as uint8 (N, H, W, C) from the EMA weights in `model_dir`.

    Raises `SamplingFailed` when the model gives non-finite values (checked before the uint8
    conversion, which would clamp them to valid-looking pixels).
    """
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
            x = denoise(model, scheduler, x, steps=steps).float().cpu()
        if not torch.isfinite(x).all():
            raise SamplingFailed(
                f"sampling from {model_dir} gave non-finite values (samples {start} to "
                f"{start + len(x) - 1}); the model's weights or its training are broken"
            )
        out.append(to_uint8(x))
    log.info("%d samples from %s (%s, %d steps)", num_samples, model_dir, cfg["objective"], steps)
    return np.concatenate(out)


def write_samples(
    model_dir: str | os.PathLike,
    *,
    samples_path: str | os.PathLike,
    grid_path: str | os.PathLike,
    cfg: dict,
    seed: int,
    device: str = "auto",
) -> str | None:
    """Write samples (.npy) and their grid (PNG) from `model_dir`, as the `sample` rule does.

    `cfg` is params["sample"] (num_samples, steps, batch_size, grid_size). A failed model folder
    or a `SamplingFailed` gives an empty samples array and a FAILED grid instead; returns why,
    or None when sampling succeeded.
    """
    failure = model_failure(model_dir)
    reason = None if failure is None else f"training failed: {failure}"
    if reason is None:
        try:
            images = generate(
                model_dir,
                num_samples=cfg["num_samples"],
                steps=cfg["steps"],
                batch_size=cfg["batch_size"],
                seed=seed,
                device=device,
            )
        except SamplingFailed as err:
            reason = str(err)
    if reason is None:
        save_grid(images[: cfg["grid_size"] ** 2], grid_path, nrow=cfg["grid_size"])
        io.save_npy(samples_path, images)
        return None
    log.error("no samples from %s: %s", model_dir, reason)
    images = empty_samples(model_dir)
    save_failed_grid(images.shape[1:], grid_path, nrow=cfg["grid_size"])
    io.save_npy(samples_path, images)
    return reason


def empty_samples(model_dir: str | os.PathLike) -> np.ndarray:
    """uint8 (0, H, W, C): H = W the trained resolution, C the network's input channels (1 when
    the folder holds no network, as a failed run's does not)."""
    cfg = resolve_config(io.load_json(Path(model_dir) / SUMMARY)["cfg"])
    config = Path(model_dir) / MODELS[cfg["model"]].subfolder / "config.json"
    channels = io.load_json(config)["in_channels"] if config.is_file() else 1
    return np.zeros((0, cfg["resolution"], cfg["resolution"], channels), dtype=np.uint8)


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
    _save_png(Image.fromarray(grid[..., 0] if c == 1 else grid), path)


def save_failed_grid(
    image_shape: tuple[int, int, int], path: str | os.PathLike, *, nrow: int = 8
) -> None:
    """A PNG the size of an `nrow` x `nrow` grid of (H, W, C) images (or larger, to fit the text)
    that reads FAILED, white on black; written atomically."""
    h, w, c = image_shape
    mode = "L" if c == 1 else "RGB"
    grid_size = (nrow * (w + 2) + 2, nrow * (h + 2) + 2)  # as save_grid's, with 2-pixel gaps
    font = ImageFont.load_default(size=max(10, grid_size[0] // 6))
    left, top, right, bottom = font.getbbox(FAILED_TEXT)
    text_w, text_h = right - left, bottom - top
    size = (max(grid_size[0], text_w + 4), max(grid_size[1], text_h + 4))
    picture = Image.new(mode, size)
    origin = ((size[0] - text_w) // 2 - left, (size[1] - text_h) // 2 - top)
    ImageDraw.Draw(picture).text(origin, FAILED_TEXT, fill="white", font=font)
    _save_png(picture, path)


def _save_png(picture: Image.Image, path: str | os.PathLike) -> None:
    with io.atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
