"""The latent space of the paper's DiT: a KL autoencoder (diffusers ``AutoencoderKL``), its
folder, the measurements of it and the one-time encoding of the training images.
(Training it and the ``autoencoder`` stage: diffprune.autoencoder_train.)

An autoencoder folder holds diffusers' ``save_pretrained`` files (``load_autoencoder`` reads it,
the same code path as a hub id) plus ``autoencoder.json`` (``autoencoder_info``).

Encoding: the cached latents are the posterior MEAN, not a sample. They are computed once and
reused by every run and seed, so a sample would freeze one arbitrary noise draw into all of them;
the mean is deterministic, and with ``kl_weight: 1e-6`` the posterior std is tiny anyway.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from diffprune import io
from diffprune.batches import row_batches
from diffprune.config import pretrained_problem, value_problems
from diffprune.data import to_model_input, to_uint8
from diffprune.defaults import with_defaults
from diffprune.device import resolve_device
from diffprune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INFO = "autoencoder.json"
SOURCES = ("train", "pretrained")
TRAIN_KEYS = ("block_channels", "latent_channels", "layers_per_block", "steps", "batch_size", "lr")
SCALE_IMAGES = 10_000  # at most this many training images measure the latent scale


# --------------------------------------------------------------------------- config and model
def resolve_config(cfg: dict) -> dict:
    """params["autoencoder"] with optional keys filled from the schema's defaults; checks keys
    and values by the schema's and config's rules."""
    cfg = with_defaults("autoencoder", cfg)
    if "source" not in cfg:
        raise ConfigError(f"autoencoder.source is missing; allowed: {', '.join(SOURCES)}")
    problems = value_problems("autoencoder", cfg) or [pretrained_problem(cfg)]
    if any(problems):
        raise ConfigError("\n".join(filter(None, problems)))
    missing = [key for key in TRAIN_KEYS if key not in cfg]
    if cfg["source"] == "train" and missing:
        raise ConfigError(f"autoencoder config is missing {missing}; required to train")
    return cfg


def build_autoencoder(cfg: dict, *, in_channels: int) -> AutoencoderKL:
    """A fresh AutoencoderKL (weights from torch's global RNG); one level per block width, each
    but the last halving the resolution."""
    channels = tuple(int(c) for c in cfg["block_channels"])
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=int(cfg["layers_per_block"]),
        latent_channels=int(cfg["latent_channels"]),
        # GroupNorm needs a group count that divides every width: 32 (the default) when it can.
        norm_num_groups=math.gcd(32, *channels),
    )


def downsampling_factor(ae: AutoencoderKL) -> int:
    return 2 ** (len(ae.config.block_out_channels) - 1)


def latent_shape(ae: AutoencoderKL, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of one image's latents at `resolution`."""
    factor = downsampling_factor(ae)
    if resolution % factor:
        raise ConfigError(
            f"resolution {resolution} must be divisible by the autoencoder's down-sampling "
            f"factor {factor}"
        )
    return ae.config.latent_channels, resolution // factor, resolution // factor


def load_autoencoder(
    source: str | os.PathLike, *, subfolder: str | None = None, revision: str | None = None
) -> AutoencoderKL:
    """An AutoencoderKL in eval mode on the CPU from a local folder or a hub id."""
    try:
        ae = AutoencoderKL.from_pretrained(str(source), subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as err:
        where = f" (subfolder {subfolder!r})" if subfolder else ""
        local = "" if Path(source).exists() else "; no such local folder"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"cannot load autoencoder {str(source)!r}{where}{local}: {reason}; a hub id needs "
            "network access: offline, give a local folder written by save_pretrained"
        ) from err
    return ae.eval()


def autoencoder_info(folder: str | os.PathLike) -> dict:
    """The autoencoder.json of a folder written by `prepare_autoencoder`."""
    path = Path(folder) / INFO
    if not path.is_file():
        raise DataError(f"{folder} is not an autoencoder folder (no {INFO}); run autoencoder first")
    return io.load_json(path)


# --------------------------------------------------------------------------- measurements
def measure_scale_factor(
    ae: AutoencoderKL,
    images: np.ndarray,
    *,
    resolution: int,
    seed: int,
    max_images: int = SCALE_IMAGES,
    batch_size: int = 256,
    device: str = "auto",
) -> tuple[float, int]:
    """(1 / std of the latents of a seeded subset of up to `max_images` images, subset size).

    Diffusion models expect inputs of about unit variance, so the DiT trains on ``latents *
    scale_factor`` and decodes ``latents / scale_factor``. The factor is MEASURED on the training
    images (Stable Diffusion's 0.18215 is the same idea, measured once on its own data)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(images), size=min(len(images), max_images), replace=False))
    total, squares, count = 0.0, 0.0, 0
    for _, z in _encoded(ae, images, rows, resolution, batch_size, device, progress=False):
        z = z.double()
        total += z.sum().item()
        squares += z.square().sum().item()
        count += z.numel()
    std = math.sqrt(max(squares / count - (total / count) ** 2, 0.0))
    if not std > 0:
        raise DataError(f"the latents of {len(rows)} images have std {std}: cannot scale them")
    return 1.0 / std, len(rows)


@torch.no_grad()
def reconstruction_error(
    ae: AutoencoderKL,
    images: np.ndarray,
    *,
    resolution: int,
    batch_size: int = 256,
    device: str = "auto",
) -> dict[str, float]:
    """MSE and PSNR in [0, 255] pixel terms of decode(posterior mean) against the input at
    `resolution` (a gray image against the channel mean of an RGB autoencoder's output)."""
    squares, count = 0.0, 0
    for rows, z in _encoded(ae, images, None, resolution, batch_size, device, progress=False):
        x = to_model_input(np.asarray(images[rows]), resolution)
        recon = _to_channels(decode(ae, z), x.shape[1]).cpu()
        squares += ((recon - x) * 127.5).double().square().sum().item()
        count += x.numel()
    mse = squares / count
    psnr = 10 * math.log10(255.0**2 / mse) if mse > 0 else float("inf")
    return {"mse": mse, "psnr": psnr}


# --------------------------------------------------------------------------- encode and decode
def encode(
    ae: AutoencoderKL,
    images: np.ndarray,
    *,
    resolution: int,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """float16 (N, C, h, w) posterior means of uint8 NHWC `images` resized to `resolution`, in
    the images' order. Moves `ae` to `device`. `num_workers`: loader processes that read and
    resize the images (diffprune.batches.row_batches); the latents are the same bytes for any
    number."""
    latents = np.empty((len(images), *latent_shape(ae, resolution)), dtype=np.float16)
    _fill(latents, ae, images, resolution, batch_size, device, num_workers, progress)
    return latents


def encode_to_file(
    ae: AutoencoderKL,
    images: np.ndarray,
    out_path: str | os.PathLike,
    *,
    resolution: int,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[int, ...]:
    """`encode` streamed batch by batch into a float16 .npy (memory O(batch)); the file appears
    under its name only when complete. Returns its shape."""
    shape = (len(images), *latent_shape(ae, resolution))
    with io.atomic_path(out_path) as tmp:
        latents = io.open_memmap(tmp, dtype=np.float16, shape=shape)  # disk allocated first
        try:
            _fill(latents, ae, images, resolution, batch_size, device, num_workers, progress)
            latents.flush()
        finally:
            del latents  # closes the memory map before the rename
    return shape


@torch.no_grad()
def decode(ae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) on the autoencoder's device from UNSCALED latents (the
    caller divides by scale_factor first)."""
    z = latents.to(device=ae.device, dtype=ae.dtype)
    return ae.decode(z).sample.float().clamp(-1.0, 1.0)


def decode_to_uint8(
    ae: AutoencoderKL,
    latents_unscaled: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 256,
    device: str = "auto",
    channels: int | None = None,
) -> np.ndarray:
    """uint8 NHWC images from unscaled latents, batch by batch. `channels=1` turns an RGB
    autoencoder's output gray (channel mean), for a gray dataset."""
    ae.to(resolve_device(device))
    z = latents_unscaled
    if not torch.is_tensor(z):
        z = torch.from_numpy(np.asarray(z))
    parts = []
    for start in range(0, len(z), batch_size):
        x = decode(ae, z[start : start + batch_size].float())
        parts.append(to_uint8(_to_channels(x, channels or x.shape[1])))
    return np.concatenate(parts)


# --------------------------------------------------------------------------- the cached latents
def write_latents(
    ae_dir: str | os.PathLike,
    images: np.ndarray,
    *,
    resolution: int,
    out_path: str | os.PathLike,
    meta_path: str | os.PathLike,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int = 0,
    images_file: str | os.PathLike | None = None,
    progress: bool = True,
    rows: range | None = None,
) -> dict:
    """Encode `images` (or one shard's `rows` of them, autoencoder.encode_shards, with `rows` in
    the record) with the autoencoder folder `ae_dir` into `out_path` (float16 .npy) and write its
    record to `meta_path`: scale factor, shape, provenance. Returns the record."""
    start = time.perf_counter()
    info = autoencoder_info(ae_dir)
    if info["resolution"] != resolution:
        raise ConfigError(
            f"resolution {resolution} differs from the {info['resolution']} the autoencoder in "
            f"{ae_dir} was measured at; rerun the autoencoder stage"
        )
    ae = load_autoencoder(ae_dir)
    part = images if rows is None else images[rows.start : rows.stop]
    shape = encode_to_file(
        ae, part, out_path, resolution=resolution, batch_size=batch_size, device=device,
        num_workers=num_workers, progress=progress,
    )  # fmt: skip
    meta = {
        "scale_factor": info["scale_factor"],
        "autoencoder": str(ae_dir),
        "autoencoder_source": info["source"],
        "autoencoder_sha256": io.file_sha256(ae_dir),
        "resolution": resolution,
        "downsampling_factor": info["downsampling_factor"],
        "shape": list(shape),
        "dtype": "float16",
        "latents": "posterior mean, unscaled: multiply by scale_factor for the diffusion model",
        "images_sha256": io.file_sha256(images_file) if images_file is not None else None,
        "device": str(ae.device),
        "num_workers": num_workers,
        "seconds": time.perf_counter() - start,
        "code_version": io.code_version(),
    }
    if rows is not None:
        meta["rows"] = [rows.start, rows.stop]
    io.save_json(meta_path, meta)
    return meta


def load_latents(path: str | os.PathLike, meta_path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """(unscaled latents, memory-mapped read-only; their record) as `write_latents` wrote them."""
    latents = np.load(path, mmap_mode="r")
    meta = io.load_json(meta_path)
    if list(latents.shape) != meta["shape"] or latents.dtype != np.dtype(meta["dtype"]):
        raise DataError(
            f"{path} holds {latents.dtype}{latents.shape}, but {meta_path} says "
            f"{meta['dtype']}{tuple(meta['shape'])}; rerun the encode stage"
        )
    return latents, meta


# --------------------------------------------------------------------------- helpers
def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise DataError(
            f"the autoencoder needs uint8 images (N,H,W,C) with N >= 1, got "
            f"{images.dtype}{images.shape}"
        )


def _check_channels(ae: AutoencoderKL, channels: int) -> None:
    if ae.config.in_channels != channels and not (channels == 1 and ae.config.in_channels == 3):
        raise DataError(
            f"the autoencoder takes {ae.config.in_channels}-channel images; these have {channels}"
        )


def _on_autoencoder(ae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """to_model_input's output on the autoencoder's device and in its dtype; gray images
    repeated to RGB for an RGB model."""
    if x.shape[1] == 1 and ae.config.in_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.to(device=ae.device, dtype=ae.dtype, non_blocking=True)


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    return x.mean(dim=1, keepdim=True) if channels == 1 and x.shape[1] != 1 else x


@torch.no_grad()
def _encoded(
    ae: AutoencoderKL,
    images: np.ndarray,
    rows: np.ndarray | None,
    resolution: int,
    batch_size: int,
    device: str,
    progress: bool,
    num_workers: int = 0,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(positions in `rows` (default: all images), float32 CPU posterior means) per batch.

    All images are read in order through row_batches, `num_workers` processes resizing them;
    a subset (`rows`, the scale factor's sample) is gathered here, batch by batch."""
    _check_channels(ae, images.shape[-1])
    latent_shape(ae, resolution)
    ae.to(resolve_device(device)).eval()
    if rows is None:
        inputs = row_batches(
            images,
            batch_size,
            transform=partial(to_model_input, resolution=resolution),
            num_workers=num_workers,
            pin_memory=ae.device.type == "cuda",
        )
    else:
        inputs = _gathered(images, rows, batch_size, resolution)
    n = len(images) if rows is None else len(rows)
    with tqdm(total=n, desc="encode", unit="img", disable=not progress) as bar:
        for where, x in inputs:
            mean = ae.encode(_on_autoencoder(ae, x)).latent_dist.mean
            yield where, mean.float().cpu()
            bar.update(where.stop - where.start)


def _gathered(
    images: np.ndarray, rows: np.ndarray, batch_size: int, resolution: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(positions in `rows`, model input of those images) per batch of `rows`."""
    for start in range(0, len(rows), batch_size):
        where = slice(start, min(start + batch_size, len(rows)))
        yield where, to_model_input(np.asarray(images[rows[where]]), resolution)


def _fill(out, ae, images, resolution, batch_size, device, num_workers, progress) -> None:
    for where, z in _encoded(
        ae, images, None, resolution, batch_size, device, progress, num_workers=num_workers
    ):
        out[where] = z.numpy().astype(np.float16)
