"""The latent space of the paper's DiT: a KL autoencoder (diffusers ``AutoencoderKL``), trained
here or copied from a pretrained one, and the one-time encoding of the training images.

Stage ``autoencoder`` (``prepare_autoencoder``) writes one folder that the rest of the pipeline
reads, whatever the source:

- ``source: train``: a small AutoencoderKL trained on the training images (``train_autoencoder``);
- ``source: pretrained``: a copy of a pretrained AutoencoderKL, from a local folder or a hub id
  such as ``stabilityai/sd-vae-ft-ema`` (the paper's alternative; hub ids need network access).

The folder holds diffusers' ``save_pretrained`` files (``load_autoencoder`` reads it, the same
code path as a hub id) plus ``autoencoder.json``: source, cfg, seed, resolution, latent shape,
down-sampling factor, the latent scale factor, held-out reconstruction quality, wall seconds and
the code version.

Latent scale: diffusion models expect inputs of about unit variance, so the DiT trains on
``latents * scale_factor`` and decodes ``latents / scale_factor``. ``scale_factor = 1 / std`` of
the training latents, MEASURED on a seeded subset of the training images (Stable Diffusion's
0.18215 is the same idea, measured once on its own data). It is also written into the saved
config's ``scaling_factor``, so the folder is self-describing for diffusers tools too.

Training loss: LDM's KL autoencoder without its perceptual (LPIPS) and adversarial terms, whose
pretrained weights cannot be had offline. Per image, the reconstruction error (squared or
absolute) summed over pixels plus ``kl_weight`` times KL(q(z|x) || N(0, I)) summed over latent
elements, averaged over the batch; ``kl_weight: 1e-6`` is LDM's value for this normalisation. The
decoder sees a posterior sample. Every random draw (batch rows, posterior noise) comes from a CPU
generator seeded by (seed, step), so a run is reproducible and resuming is exact: a checkpoint
holds the weights, the optimizer and the step, nothing else. The learning rate is constant, so
``steps`` is not part of a checkpoint's key: a longer run resumes a shorter one's checkpoint.

Encoding: the cached latents are the posterior MEAN, not a sample. They are computed once and
reused by every run and seed, so a sample would freeze one arbitrary noise draw into all of them;
the mean is deterministic, and with ``kl_weight: 1e-6`` the posterior std is tiny anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from diffprune import checkpoints, io
from diffprune.batches import row_batches
from diffprune.data import to_model_input, to_uint8
from diffprune.device import resolve_device
from diffprune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INFO = "autoencoder.json"
CHECKPOINT = checkpoints.LATEST
SOURCES = ("train", "pretrained")
LOSSES = ("mse", "l1")
# Optional keys of params["autoencoder"] and their values when absent.
DEFAULTS: dict[str, Any] = {
    "pretrained": None,
    "subfolder": None,
    "revision": None,
    "kl_weight": 1e-6,
    "loss": "mse",
    "seed": 0,
    "device": "auto",
    "encode_batch_size": 256,
    "encode_num_workers": "auto",
}
TRAIN_KEYS = ("block_channels", "latent_channels", "layers_per_block", "steps", "batch_size", "lr")
# Keys that cannot change the weights of the steps a checkpoint holds (see the module docstring).
RESUME_NEUTRAL = (
    "steps", "device", "encode_batch_size", "encode_num_workers", "pretrained", "subfolder",
    "revision",
)  # fmt: skip
HOLDOUT_FRACTION = 0.05  # the last 5% of the images: not trained on, reconstruction measured there
SCALE_IMAGES = 10_000  # at most this many training images measure the latent scale
LOG_EVERY = 50


# --------------------------------------------------------------------------- config and model
def resolve_config(cfg: dict) -> dict:
    """params["autoencoder"] with optional keys filled from DEFAULTS; checks keys and choices."""
    cfg = {**DEFAULTS, **cfg}
    if cfg.get("source") not in SOURCES:
        raise ConfigError(f"autoencoder.source = {cfg.get('source')!r}; allowed: {SOURCES}")
    if cfg["loss"] not in LOSSES:
        raise ConfigError(f"autoencoder.loss = {cfg['loss']!r}; allowed: {LOSSES}")
    if cfg["source"] == "pretrained" and not cfg["pretrained"]:
        raise ConfigError("autoencoder.pretrained = null: source pretrained needs a folder or id")
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


# --------------------------------------------------------------------------- stage entry point
def prepare_autoencoder(
    cfg: dict,
    *,
    images: np.ndarray,
    resolution: int,
    seed: int,
    out_dir: str | os.PathLike,
    test_images: np.ndarray | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Train (source train) or copy (source pretrained) the autoencoder into `out_dir`.

    Reconstruction is measured on `test_images`, or else on the last 5% of `images` (which
    training then leaves out). Returns the autoencoder.json record.
    """
    cfg = resolve_config(cfg)
    if cfg["source"] == "train":
        return train_autoencoder(
            images,
            cfg=cfg,
            resolution=resolution,
            seed=seed,
            out_dir=out_dir,
            test_images=test_images,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
        )
    start = time.perf_counter()
    _check_images(images)
    ae = load_autoencoder(cfg["pretrained"], subfolder=cfg["subfolder"], revision=cfg["revision"])
    _check_channels(ae, images.shape[-1])
    _, held_out = _split(images, test_images)
    record = {
        "source": str(cfg["pretrained"]),
        "pretrained_scaling_factor": ae.config.scaling_factor,
        **_measure(ae, images, held_out, cfg=cfg, resolution=resolution, seed=seed),
    }
    return _save(ae, out_dir, record, cfg=cfg, seed=seed, start=start)


def train_autoencoder(
    images: np.ndarray,
    *,
    cfg: dict,
    resolution: int,
    seed: int,
    out_dir: str | os.PathLike,
    test_images: np.ndarray | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 250,
    progress: bool = True,
) -> dict:
    """Train an AutoencoderKL on `images` (uint8 NHWC) resized to `resolution`; write `out_dir`.

    With `checkpoint_dir`, the state is saved every `checkpoint_every` steps and at the end, and a
    new call resumes from it when it belongs to the same run; it is deleted once `out_dir` is
    written. The run holds the folder's run lock meanwhile: a second training of it (a rerun
    beside an orphaned job) raises `checkpoints.RunLocked` at once. Returns the autoencoder.json
    record. Raises `TrainingDiverged` on a non-finite loss or non-finite weights.
    """
    lock = checkpoints.run_lock(checkpoint_dir) if checkpoint_dir is not None else nullcontext()
    with lock:
        return _train_autoencoder(
            images, cfg=cfg, resolution=resolution, seed=seed, out_dir=out_dir,
            test_images=test_images, checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every, progress=progress,
        )  # fmt: skip


def _train_autoencoder(
    images: np.ndarray,
    *,
    cfg: dict,
    resolution: int,
    seed: int,
    out_dir: str | os.PathLike,
    test_images: np.ndarray | None,
    checkpoint_dir: str | os.PathLike | None,
    checkpoint_every: int,
    progress: bool,
) -> dict:
    start = time.perf_counter()
    cfg = resolve_config({**cfg, "source": "train"})
    _check_images(images)
    train_images, held_out = _split(images, test_images)
    device = resolve_device(cfg["device"])
    torch.manual_seed(seed)  # weight initialisation
    ae = build_autoencoder(cfg, in_channels=images.shape[-1])
    latent_shape(ae, resolution)  # fails fast on a resolution the factor does not divide
    ae.to(device).train()
    optimizer = torch.optim.AdamW(ae.parameters(), lr=cfg["lr"], weight_decay=0.0)

    checkpoint = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    key = _run_key(cfg, seed=seed, resolution=resolution, images=train_images)
    first_step, history, past_seconds = _resume(checkpoint, key, cfg["steps"], ae, optimizer)
    last_good = first_step or None
    n_params = sum(p.numel() for p in ae.parameters())
    log.info(
        "training an autoencoder (%d parameters) on %d images at %d px for %d steps, batch %d, %s",
        n_params, len(train_images), resolution, cfg["steps"], cfg["batch_size"], device,
    )  # fmt: skip

    running, count = torch.zeros((), device=device), 0
    bar = tqdm(
        range(first_step + 1, cfg["steps"] + 1),
        initial=first_step,
        total=cfg["steps"],
        desc="autoencoder",
        disable=not progress,
    )
    for step in bar:
        generator = _step_generator(seed, step)
        rows = torch.randint(0, len(train_images), (cfg["batch_size"],), generator=generator)
        x = to_model_input(train_images[rows.numpy()], resolution).to(device)
        loss = _loss(ae, x, cfg=cfg, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.detach()
        count += 1
        save_now = checkpoint is not None and step % checkpoint_every == 0
        if step % LOG_EVERY == 0 or step == cfg["steps"] or save_now:
            mean_loss = (running / count).item()
            if not math.isfinite(mean_loss):
                raise checkpoints.diverged(
                    step,
                    f"mean loss {mean_loss}",
                    last_good=last_good,
                    checkpoint=checkpoint,
                    name="autoencoder training",
                )
            running.zero_()
            count = 0
            history.append((step, mean_loss))
            bar.set_postfix(loss=f"{mean_loss:.4g}")
            log.info("step %d/%d loss %.5g", step, cfg["steps"], mean_loss)
        if checkpoint is not None and (save_now or step == cfg["steps"]):
            if not checkpoints.all_finite(ae):
                raise checkpoints.diverged(
                    step,
                    "non-finite weights",
                    last_good=last_good,
                    checkpoint=checkpoint,
                    name="autoencoder training",
                )
            wall = past_seconds + time.perf_counter() - start
            _save_checkpoint(checkpoint, key, step, ae, optimizer, history, wall)
            last_good = step

    ae.eval()
    record = {
        "source": "train",
        "steps": cfg["steps"],
        "resumed_from_step": first_step,
        "final_loss": history[-1][1] if history else None,
        "history": history,
        "parameters": n_params,
        **_measure(ae, images, held_out, cfg=cfg, resolution=resolution, seed=seed),
    }
    summary = _save(ae, out_dir, record, cfg=cfg, seed=seed, start=start - past_seconds)
    if checkpoint is not None:
        checkpoints.remove(checkpoint.parent)
    return summary


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
    """(1 / std of the latents of a seeded subset of up to `max_images` images, subset size)."""
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
) -> dict:
    """Encode `images` with the autoencoder folder `ae_dir` into `out_path` (float16 .npy) and
    write its record to `meta_path`: scale factor, shape, provenance. Returns the record."""
    start = time.perf_counter()
    info = autoencoder_info(ae_dir)
    if info["resolution"] != resolution:
        raise ConfigError(
            f"resolution {resolution} differs from the {info['resolution']} the autoencoder in "
            f"{ae_dir} was measured at; rerun the autoencoder stage"
        )
    ae = load_autoencoder(ae_dir)
    shape = encode_to_file(
        ae, images, out_path, resolution=resolution, batch_size=batch_size, device=device,
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


def _split(images: np.ndarray, test_images: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(images to train on, images to measure reconstruction on)."""
    if test_images is not None:
        _check_images(test_images)
        return images, test_images
    held = math.ceil(len(images) * HOLDOUT_FRACTION)
    if len(images) - held < 1:
        raise DataError(f"{len(images)} image(s): too few to hold out {held} and train on the rest")
    return images[: len(images) - held], images[len(images) - held :]


def _step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step)."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _loss(ae: AutoencoderKL, x: torch.Tensor, *, cfg: dict, generator: torch.Generator):
    """Batch mean of (reconstruction error summed over pixels + kl_weight * KL summed)."""
    posterior = ae.encode(x).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(x.device)
    recon = ae.decode(posterior.mean + posterior.std * noise).sample
    error = (recon - x).square() if cfg["loss"] == "mse" else (recon - x).abs()
    return (error.sum(dim=(1, 2, 3)) + cfg["kl_weight"] * posterior.kl()).mean()


def _measure(
    ae: AutoencoderKL, images, held_out, *, cfg: dict, resolution: int, seed: int
) -> dict[str, Any]:
    """The part of autoencoder.json that both sources measure the same way."""
    kwargs = {"batch_size": cfg["encode_batch_size"], "device": cfg["device"]}
    scale, n_scale = measure_scale_factor(ae, images, resolution=resolution, seed=seed, **kwargs)
    quality = reconstruction_error(ae, held_out, resolution=resolution, **kwargs)
    return {
        "resolution": resolution,
        "image_channels": int(images.shape[-1]),
        "latent_shape": list(latent_shape(ae, resolution)),
        "downsampling_factor": downsampling_factor(ae),
        "scale_factor": scale,
        "scale_images": n_scale,
        "reconstruction": {**quality, "n_images": len(held_out)},
        "device": str(ae.device),
    }


def _save(ae: AutoencoderKL, out_dir, record: dict, *, cfg: dict, seed: int, start: float) -> dict:
    """Write the folder atomically: save_pretrained files (with the measured scaling_factor) and
    autoencoder.json."""
    ae.register_to_config(scaling_factor=record["scale_factor"])
    record = {
        **record,
        "cfg": cfg,
        "seed": seed,
        "wall_seconds": time.perf_counter() - start,
        "code_version": io.code_version(),
    }
    with io.atomic_path(out_dir, directory=True) as tmp:
        ae.to("cpu").save_pretrained(tmp)
        io.save_json(tmp / INFO, record)
    log.info(
        "wrote %s: scale factor %.5g, held-out PSNR %.2f dB",
        out_dir, record["scale_factor"], record["reconstruction"]["psnr"],
    )  # fmt: skip
    return record


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


def _run_key(cfg: dict, *, seed: int, resolution: int, images: np.ndarray) -> dict:
    """What a checkpoint must match to be resumed."""
    relevant = {k: v for k, v in cfg.items() if k not in RESUME_NEUTRAL}
    digest = hashlib.sha256(f"{images.shape}".encode())
    digest.update(np.ascontiguousarray(images).data)
    return {
        "cfg_sha256": hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest(),
        "seed": seed,
        "resolution": resolution,
        "images_sha256": digest.hexdigest(),
    }


def _resume(
    checkpoint: Path | None, key: dict, steps: int, ae: AutoencoderKL, optimizer
) -> tuple[int, list[tuple[int, float]], float]:
    """Load this run's checkpoint into `ae` and `optimizer`, if there is one: (step, loss
    history, wall seconds so far); (0, [], 0.0) otherwise."""
    state = checkpoints.load(checkpoint.parent, key, max_step=steps) if checkpoint else None
    if state is None:
        return 0, [], 0.0
    ae.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], [tuple(row) for row in state["history"]], state["wall_seconds"]


def _save_checkpoint(path: Path, key, step, ae, optimizer, history, wall_seconds) -> None:
    state = {
        "key": key,
        "step": step,
        "model": ae.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": history,
        "wall_seconds": wall_seconds,
    }
    checkpoints.save(path.parent, state)
