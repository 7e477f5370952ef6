"""Stage ``autoencoder``: train the latent autoencoder here, or copy a pretrained one.

Training loss: LDM's KL autoencoder without its perceptual (LPIPS) and adversarial terms, whose
pretrained weights cannot be had offline. Per image, the reconstruction error (squared or
absolute) summed over pixels plus ``kl_weight`` times KL(q(z|x) || N(0, I)) summed over latent
elements, averaged over the batch; ``kl_weight: 1e-6`` is LDM's value for this normalisation. The
decoder sees a posterior sample. Every random draw (batch rows, posterior noise) comes from the
run's step generator, seeded by (seed, step) (``diffprune.checkpoints.step_generator``; the
diffusion training's is (seed, 0, step)), so resuming is exact. The run lock, checkpoint rotation,
resume and divergence checks are ``diffprune.checkpoints.Run``'s, as for the diffusion training.
The learning rate is constant, so ``steps`` is not part of a checkpoint's key: a longer run
resumes a shorter one's checkpoint.

The written folder's autoencoder.json: source, cfg, seed, resolution, latent shape,
down-sampling factor, the measured latent scale factor (also written into the saved config's
``scaling_factor``, so the folder is self-describing for diffusers tools too), held-out
reconstruction quality, wall seconds and the code version.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from diffprune import checkpoints, io
from diffprune.autoencoder import (
    INFO,
    _check_channels,
    _check_images,
    build_autoencoder,
    downsampling_factor,
    latent_shape,
    load_autoencoder,
    measure_scale_factor,
    reconstruction_error,
    resolve_config,
)
from diffprune.data import to_model_input
from diffprune.device import resolve_device
from diffprune.errors import DataError

log = logging.getLogger(__name__)

# Keys that cannot change the weights of the steps a checkpoint holds (see the module docstring).
RESUME_NEUTRAL = (
    "steps", "device", "encode_batch_size", "encode_num_workers", "pretrained", "subfolder",
    "revision",
)  # fmt: skip
HOLDOUT_FRACTION = 0.05  # the last 5% of the images: not trained on, reconstruction measured there
LOG_EVERY = 50


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

    With `checkpoint_dir`, the run holds its lock while it trains, the state is saved every
    `checkpoint_every` steps and at the end, and a new call resumes from it when it belongs to
    the same run; it is deleted once `out_dir` is written. Returns the autoencoder.json record.
    Raises `TrainingDiverged` on a non-finite loss or non-finite weights (checked at every
    checkpoint step, with or without `checkpoint_dir`).
    """
    start = time.perf_counter()
    cfg = resolve_config({**cfg, "source": "train"})
    _check_images(images)
    train_images, held_out = _split(images, test_images)
    device = resolve_device(cfg["device"], key="autoencoder.device")
    run = checkpoints.Run(checkpoint_dir, name="autoencoder training")
    with run.lock():
        torch.manual_seed(seed)  # weight initialisation
        ae = build_autoencoder(cfg, in_channels=images.shape[-1])
        latent_shape(ae, resolution)  # fails fast on a resolution the factor does not divide
        ae.to(device).train()
        optimizer = torch.optim.AdamW(ae.parameters(), lr=cfg["lr"], weight_decay=0.0)
        key = _run_key(cfg, seed=seed, resolution=resolution, images=train_images)
        state = run.resume(key, max_step=cfg["steps"]) or {}
        if state:
            ae.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        first_step, past_seconds = state.get("step", 0), state.get("wall_seconds", 0.0)
        history = [tuple(row) for row in state.get("history", [])]
        n_params = sum(p.numel() for p in ae.parameters())
        log.info(
            "training an autoencoder (%d parameters) on %d images at %d px for %d steps, "
            "batch %d, %s",
            n_params, len(train_images), resolution, cfg["steps"], cfg["batch_size"], device,
        )  # fmt: skip
        _train_steps(
            run, ae, optimizer, train_images, history, cfg=cfg, resolution=resolution,
            seed=seed, first_step=first_step, checkpoint_every=checkpoint_every,
            wall=lambda: past_seconds + time.perf_counter() - start, progress=progress,
        )  # fmt: skip

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
        run.finish()
    return summary


def _train_steps(
    run: checkpoints.Run,
    ae: AutoencoderKL,
    optimizer: torch.optim.Optimizer,
    images: np.ndarray,
    history: list[tuple[int, float]],
    *,
    cfg: dict,
    resolution: int,
    seed: int,
    first_step: int,
    checkpoint_every: int,
    wall: Callable[[], float],
    progress: bool,
) -> None:
    """The steps after `first_step`: every LOG_EVERY steps, at checkpoint steps (with a
    checkpoint folder) and at the last step the mean loss is checked and added to `history`;
    at every checkpoint step the weights are checked and, with a folder, saved."""
    device = ae.device
    running, count = torch.zeros((), device=device), 0
    bar = tqdm(
        range(first_step + 1, cfg["steps"] + 1),
        initial=first_step,
        total=cfg["steps"],
        desc="autoencoder",
        disable=not progress,
    )
    for step in bar:
        generator = checkpoints.step_generator(seed, step)  # the autoencoder's prefix: (seed,)
        rows = torch.randint(0, len(images), (cfg["batch_size"],), generator=generator)
        x = to_model_input(images[rows.numpy()], resolution).to(device)
        loss = _loss(ae, x, cfg=cfg, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.detach()
        count += 1
        checkpoint_step = step % checkpoint_every == 0 or step == cfg["steps"]
        saving = checkpoint_step and run.directory is not None
        if step % LOG_EVERY == 0 or step == cfg["steps"] or saving:
            mean_loss = (running / count).item()
            run.check_loss(step, mean_loss)
            running.zero_()
            count = 0
            history.append((step, mean_loss))
            bar.set_postfix(loss=f"{mean_loss:.4g}")
            log.info("step %d/%d loss %.5g", step, cfg["steps"], mean_loss)
        if checkpoint_step:
            run.check_weights(step, ae)
            run.save(step, lambda: _checkpoint_state(ae, optimizer, history, wall()))


def _checkpoint_state(
    ae: AutoencoderKL, optimizer: torch.optim.Optimizer, history: list, wall_seconds: float
) -> dict[str, Any]:
    """A checkpoint's content beside its key and step: the weights, the optimizer, the loss
    history and the wall seconds so far (every draw is the step generator's: no RNG state)."""
    return {
        "model": ae.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": history,
        "wall_seconds": wall_seconds,
    }


def _run_key(cfg: dict, *, seed: int, resolution: int, images: np.ndarray) -> dict:
    """What a checkpoint must match to be resumed: cfg but RESUME_NEUTRAL, seed, resolution and
    the training images."""
    return checkpoints.run_key(
        cfg,
        neutral=RESUME_NEUTRAL,
        seed=seed,
        resolution=resolution,
        images_sha256=checkpoints.array_sha256(images),
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
