"""Generate images from a trained model folder, and write a PNG mosaic of them.

One entry point, `generate`, for every model of the registry (UNet, DiT), in pixel or latent space.
DDPM models sample with DDIM (eta 0, deterministic given the initial noise); flow-matching models
with Euler steps on the ODE dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data) on a uniform grid.
All initial noise is drawn at once from a CPU generator seeded with `seed`, and then, for a
class-conditional model, the samples' class labels (uniform over the classes) from the same
generator, so the samples do not depend on the device's RNG or on `batch_size`.

Classifier-free guidance (conditional models, ``guidance_scale`` s != 1, the paper's 4.0 on
ImageNet): the prediction is ``uncond + s * (cond - uncond)``, from one forward pass of the batch
with its labels and with the null label, as DiT's ``forward_with_cfg``. A latent model's samples
are divided by the scale factor recorded in its train.json and decoded by its autoencoder.

A failed run (a failed model folder, or samples with non-finite values) gets no samples:
`write_samples` writes an empty array and a grid that reads FAILED, so the workflow goes on and
evaluation refuses the run.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from diffprune import io
from diffprune.data import to_uint8
from diffprune.defaults import with_defaults
from diffprune.device import resolve_device
from diffprune.diffusion import MODELS, null_label, resolve_config
from diffprune.errors import ConfigError, SamplingFailed
from diffprune.model_folder import load_model
from diffprune.status import SUMMARY, model_failure

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
    guidance_scale: float = 1.0,
    class_labels: np.ndarray | None = None,
    progress: bool = True,
) -> np.ndarray:
    """`num_samples` images as uint8 (N, H, W, C) from the EMA weights in `model_dir`.

    A conditional model samples `class_labels` (int, (num_samples,)) if given, else seeded
    uniform labels; `guidance_scale` != 1 needs a conditional model (1: no guidance).
    Raises `SamplingFailed` when the model gives non-finite values (checked before the uint8
    conversion or decoding, which would turn them into valid-looking pixels).
    """
    for name, value in (("num_samples", num_samples), ("steps", steps), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    model, scheduler, cfg = load_model(model_dir)
    latent = io.load_json(Path(model_dir) / SUMMARY).get("latent")
    device = resolve_device(device)
    model.to(device)
    size = model.config.sample_size
    shape = (num_samples, model.config.in_channels, size, size)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=generator)
    labels = _sample_labels(
        model, cfg, num_samples, class_labels, guidance_scale=guidance_scale, generator=generator
    )
    denoise = _ddim if cfg["objective"] == "ddpm" else _euler
    to_images = _image_decoder(latent, batch_size=batch_size, device=device)
    out = []
    for start in tqdm(range(0, num_samples, batch_size), desc="sample", disable=not progress):
        x = noise[start : start + batch_size].to(device)
        batch_labels = None if labels is None else labels[start : start + batch_size].to(device)
        predict = partial(_predict, model, class_labels=batch_labels, guidance_scale=guidance_scale)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = denoise(predict, scheduler, x, steps=steps).float().cpu()
        if not torch.isfinite(x).all():
            raise SamplingFailed(
                f"sampling from {model_dir} gave non-finite values (samples {start} to "
                f"{start + len(x) - 1}); the model's weights or its training are broken"
            )
        out.append(to_images(x))
    log.info(
        "%d samples from %s (%s, %d steps, guidance %g%s)", num_samples, model_dir,
        cfg["objective"], steps, guidance_scale, ", decoded" if latent else "",
    )  # fmt: skip
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

    `cfg` is params["sample"] (num_samples, steps, batch_size, grid_size, and optionally
    guidance_scale, default 1). A failed model folder
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
                guidance_scale=with_defaults("sample", cfg)["guidance_scale"],
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
    the folder holds no network, as a failed run's does not; a latent model's image channels)."""
    summary = io.load_json(Path(model_dir) / SUMMARY)
    cfg = resolve_config(summary["cfg"])
    config = Path(model_dir) / MODELS[cfg["model"]].subfolder / "config.json"
    channels = io.load_json(config)["in_channels"] if config.is_file() else 1
    if summary.get("latent") is not None:
        channels = summary["latent"].get("image_channels", 3)
    return np.zeros((0, cfg["resolution"], cfg["resolution"], channels), dtype=np.uint8)


def _sample_labels(
    model: torch.nn.Module,
    cfg: dict,
    num_samples: int,
    class_labels: np.ndarray | None,
    *,
    guidance_scale: float,
    generator: torch.Generator,
) -> torch.Tensor | None:
    """The samples' class labels: None for a UNet, the null label for an unconditional DiT,
    `class_labels` or seeded uniform ones for a conditional DiT."""
    if not cfg["conditional"]:
        if class_labels is not None or guidance_scale != 1:
            raise ConfigError(
                f"class labels and guidance (sample.guidance_scale = {guidance_scale}) need a "
                "conditional model (train.conditional: true)"
            )
        takes_labels = MODELS[cfg["model"]].class_labels
        return torch.full((num_samples,), null_label(model)) if takes_labels else None
    num_classes = null_label(model)
    if class_labels is None:
        return torch.randint(0, num_classes, (num_samples,), generator=generator)
    labels = torch.as_tensor(np.asarray(class_labels), dtype=torch.int64)
    if labels.shape != (num_samples,) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"class_labels must be {num_samples} labels in [0, {num_classes}), got "
            f"{tuple(labels.shape)} in [{labels.min()}, {labels.max()}]"
        )
    return labels


def _predict(
    model: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    class_labels: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """The model's prediction (noise or velocity) at the 0-dim time `t` for the batch `x`, with
    classifier-free guidance when `guidance_scale` != 1: one forward pass of [x with its labels,
    x with the null label]."""
    t = t.to(x.device).expand(len(x))
    if class_labels is None:
        return model(x, t).sample
    if guidance_scale == 1:
        return model(x, t, class_labels=class_labels).sample
    null = torch.full_like(class_labels, null_label(model))
    both = model(
        torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([class_labels, null])
    ).sample.float()
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def _ddim(predict: Callable, scheduler, x: torch.Tensor, *, steps: int) -> torch.Tensor:
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    for t in ddim.timesteps:
        eps = predict(x, t)
        x = ddim.step(eps.float(), t, x, eta=0.0).prev_sample
    return x


@torch.no_grad()
def _euler(predict: Callable, scheduler, x: torch.Tensor, *, steps: int) -> torch.Tensor:
    times = torch.linspace(0.0, 1.0, steps + 1, device=x.device)
    for t, t_next in itertools.pairwise(times):
        velocity = predict(x, scheduler.timestep_input(t))
        x = x + (t_next - t) * velocity.float()
    return x


def _image_decoder(
    latent: dict[str, Any] | None, *, batch_size: int, device: torch.device
) -> Callable[[torch.Tensor], np.ndarray]:
    """Sampled float (N, C, h, w) -> uint8 images (N, H, W, C): `to_uint8` in pixel space; for a
    latent model, divided by its scale factor and decoded by its autoencoder (loaded once)."""
    if latent is None:
        return to_uint8
    # imported on use: pixel-space sampling needs no autoencoder code
    from diffprune.autoencoder import decode_to_uint8, load_autoencoder

    autoencoder = load_autoencoder(latent["autoencoder"])
    scale = latent["scale_factor"]
    channels = latent.get("image_channels")  # grey data through an RGB autoencoder stays grey
    return lambda z: decode_to_uint8(
        autoencoder, z / scale, batch_size=batch_size, device=device, channels=channels
    )


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
