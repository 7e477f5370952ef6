"""Surrogate diffusion models for the score-based selection rules ("score once, select many").

One surrogate is trained on the full training set; its evenly spaced snapshots feed EL2N and GraNd
(the last snapshot, EMA or raw weights) and forgetting (the per-sample loss of the raw weights
recorded at every snapshot: the training dynamics, which the EMA would smooth away). MoSo trains one
surrogate per disjoint subset of the data and uses the raw weights (gradients of the trained model,
as Tan et al.). Every per-sample quantity uses a FIXED noise and timestep per sample
(diffprune.draws), so loss records taken at different snapshots are comparable.

A surrogate folder holds:
    model/                 final EMA weights and train.json, written by diffprune.train.train
    snapshots/step_<step>.pt  raw (non-EMA) model state dicts at the snapshot steps
    snapshots/ema_step_<step>.pt  the EMA model's state dicts at the same steps
    losses.npy             float32 (num_snapshots, N): per-sample loss at each snapshot (forgetting)
    surrogate.json         cfg, seed, snapshot steps, image hash, wall seconds
A MoSo folder holds subsets.npy (int64 (N,): the subset of each sample), subset_<k>/ (one surrogate
folder each) and moso.json.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch

from diffprune import checkpoints, io
from diffprune.diffusion import build_model
from diffprune.draws import model_device, sample_losses
from diffprune.errors import DataError
from diffprune.train import train

log = logging.getLogger(__name__)

SNAPSHOTS = "snapshots"
LOSSES = "losses.npy"
META = "surrogate.json"
MOSO_META = "moso.json"
SUBSETS = "subsets.npy"
WEIGHTS = ("ema", "raw")


def images_sha256(images: np.ndarray) -> str:
    """Content hash of an image array, so scores can check they read the surrogate's own data."""
    images = np.ascontiguousarray(images)
    digest = hashlib.sha256(f"{images.dtype}{images.shape}".encode())
    digest.update(memoryview(images).cast("B"))
    return digest.hexdigest()


def snapshot_steps(steps: int, num_snapshots: int) -> list[int]:
    """Evenly spaced snapshot steps: every steps // num_snapshots steps, num_snapshots of them."""
    if num_snapshots < 1 or num_snapshots > steps:
        raise ValueError(f"num_snapshots must be in [1, steps={steps}], got {num_snapshots}")
    every = steps // num_snapshots
    return [every * k for k in range(1, num_snapshots + 1)]


def _snapshot_name(step: int, weights: str = "raw") -> str:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    return f"{'ema_' if weights == 'ema' else ''}step_{step:07d}.pt"


def _save_state(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Write a CPU copy of `model`'s state dict to `path` (atomically) and return it."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    with io.atomic_path(path) as tmp:
        torch.save(state, tmp)
    return state


def train_surrogate(
    images: np.ndarray,
    *,
    cfg: dict,
    seed: int,
    out_dir: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    num_snapshots: int = 10,
    record_losses: bool = True,
    loss_batch_size: int = 256,
    log_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Train one diffusion model on `images` (uint8 NHWC) and keep `num_snapshots` snapshots.

    `cfg` is a train config (params["train"], possibly with fewer steps). Snapshots (raw and EMA
    weights) and loss records are first written to checkpoint_dir/snapshots (which survives a
    failed job, like train()'s resumable checkpoints) and then copied into out_dir, so a resumed
    run still has the snapshots taken before the interruption. With `record_losses` the loss of
    EVERY sample under the raw weights is recorded at every snapshot, under the fixed per-sample
    draws of `seed` (forgetting scores need >= 2). The job holds checkpoint_dir's run lock from
    start to end: a second training of it raises `checkpoints.RunLocked` at once.
    Returns the surrogate.json record.
    """
    with checkpoints.run_lock(checkpoint_dir):  # the whole job, snapshots and copies too
        steps = snapshot_steps(int(cfg["steps"]), num_snapshots)
        if record_losses and num_snapshots < 2:
            raise ValueError(f"forgetting needs >= 2 loss records; num_snapshots={num_snapshots}")
        out_dir, work = Path(out_dir), Path(checkpoint_dir) / SNAPSHOTS
        work.mkdir(parents=True, exist_ok=True)
        on_snapshot = partial(
            _take_snapshot, steps=steps, work=work, images=images, cfg=cfg, seed=seed,
            record_losses=record_losses, loss_batch_size=loss_batch_size,
        )  # fmt: skip
        # train() holds the run's lock and checkpoints, resumes and checks it (checkpoints.Run)
        summary = train(
            images=images,
            cfg=cfg,
            seed=seed,
            out_dir=out_dir / "model",
            checkpoint_dir=checkpoint_dir,
            log_dir=log_dir,
            snapshot_every=steps[0],
            on_snapshot=on_snapshot,
            progress=progress,
        )
        _collect_snapshots(work, out_dir, steps, record_losses, checkpoint_dir)
        meta = {
            "cfg": summary["cfg"],
            "seed": seed,
            "n": len(images),
            "image_shape": list(images.shape[1:]),
            "in_channels": int(images.shape[-1]),
            "images_sha256": images_sha256(images),
            "num_snapshots": num_snapshots,
            "snapshot_steps": steps,
            "record_losses": record_losses,
            "seconds": summary["wall_seconds"],
            "gpu_seconds": summary["wall_seconds"] if summary["device"].startswith("cuda") else 0.0,
            "train": summary,
            "code_version": io.code_version(),
        }
        io.save_json(out_dir / META, meta)
        shutil.rmtree(work)  # like train()'s checkpoint: only kept until the outputs are complete
        return meta


def _take_snapshot(
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    *,
    steps: list[int],
    work: Path,
    images: np.ndarray,
    cfg: dict,
    seed: int,
    record_losses: bool,
    loss_batch_size: int,
) -> None:
    """train()'s on_snapshot: at the snapshot `steps`, save the raw and EMA weights to `work`
    and, with `record_losses`, every sample's loss under the raw weights."""
    if step not in steps:
        return
    _save_state(ema, work / _snapshot_name(step, "ema"))
    state = _save_state(model, work / _snapshot_name(step))
    if record_losses:
        # Score a float32 copy, exactly what load_snapshot gives later: the training model may
        # run its forward under accelerate's mixed-precision autocast.
        with torch.random.fork_rng(devices=[]):  # building draws initial weights
            snapshot = build_model(cfg, in_channels=int(images.shape[-1]))
        snapshot.load_state_dict(state)
        losses = sample_losses(
            snapshot.to(model_device(model)),
            images,
            cfg=cfg,
            sample_ids=np.arange(len(images)),
            seed=seed,
            batch_size=loss_batch_size,
            progress=False,
        )
        io.save_npy(work / f"losses_{step:07d}.npy", losses.astype(np.float32))
    log.info("surrogate snapshot at step %d", step)


def _collect_snapshots(
    work: Path, out_dir: Path, steps: list[int], record_losses: bool, checkpoint_dir
) -> None:
    """Copy the snapshots from `work` into out_dir/snapshots and stack the loss records into
    out_dir/losses.npy; refuse when any is missing."""
    names = [_snapshot_name(s, weights) for s in steps for weights in WEIGHTS]
    missing = [s for s in steps for w in WEIGHTS if not (work / _snapshot_name(s, w)).exists()]
    if record_losses:
        missing += [s for s in steps if not (work / f"losses_{s:07d}.npy").exists()]
    if missing:
        raise RuntimeError(
            f"surrogate snapshots missing for steps {sorted(set(missing))} in {work}; "
            f"delete {checkpoint_dir} and train the surrogate again"
        )
    (out_dir / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
    for name in names:
        with io.atomic_path(out_dir / SNAPSHOTS / name) as tmp:
            shutil.copyfile(work / name, tmp)
    if record_losses:
        records = np.stack([np.load(work / f"losses_{s:07d}.npy") for s in steps])
        io.save_npy(out_dir / LOSSES, records)


def moso_subsets(n: int, *, num_subsets: int, seed: int) -> np.ndarray:
    """Subset id (int64, (n,)) of every sample: a seeded split into near-equal disjoint parts."""
    if not 1 <= num_subsets <= n // 2:
        raise ValueError(
            f"num_subsets must be in [1, n//2={n // 2}] (MoSo needs >= 2 samples per "
            f"subset), got {num_subsets}"
        )
    order = np.random.default_rng(seed).permutation(n)
    subsets = np.empty(n, dtype=np.int64)
    for k, part in enumerate(np.array_split(order, num_subsets)):
        subsets[part] = k
    return subsets


def train_moso_surrogates(
    images: np.ndarray,
    *,
    num_subsets: int,
    cfg: dict,
    seed: int,
    out_dir: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    num_snapshots: int = 3,
    log_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Split the data into `num_subsets` seeded disjoint subsets; train one surrogate on each.

    Surrogate k trains with seed `seed + k` in out_dir/subset_<k> (checkpoints in
    checkpoint_dir/subset_<k>), under checkpoint_dir's run lock. Writes subsets.npy and
    moso.json; returns the moso.json record.
    """
    with checkpoints.run_lock(checkpoint_dir):
        out_dir = Path(out_dir)
        subsets = moso_subsets(len(images), num_subsets=num_subsets, seed=seed)
        io.save_npy(out_dir / SUBSETS, subsets)
        records = []
        for k in range(num_subsets):
            log.info("MoSo surrogate %d/%d", k + 1, num_subsets)
            records.append(
                train_surrogate(
                    np.asarray(images[subsets == k]),
                    cfg=cfg,
                    seed=seed + k,
                    out_dir=out_dir / f"subset_{k}",
                    checkpoint_dir=Path(checkpoint_dir) / f"subset_{k}",
                    num_snapshots=num_snapshots,
                    record_losses=False,
                    log_dir=None if log_dir is None else Path(log_dir) / f"subset_{k}",
                    progress=progress,
                )
            )
        meta = {
            "num_subsets": num_subsets,
            "seed": seed,
            "n": len(images),
            "images_sha256": images_sha256(images),
            "subset_sizes": np.bincount(subsets, minlength=num_subsets).tolist(),
            "seconds": sum(r["seconds"] for r in records),
            "gpu_seconds": sum(r["gpu_seconds"] for r in records),
            "code_version": io.code_version(),
        }
        io.save_json(out_dir / MOSO_META, meta)
        return meta


def load_snapshot(
    surrogate_dir: str | os.PathLike,
    step: int | None = None,
    *,
    weights: str = "raw",
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """The surrogate's model at a snapshot step (default: the last one), in eval mode.

    weights: "raw" (the trained weights) or "ema" (their exponential moving average at that step,
    what a model samples from).
    """
    surrogate_dir = Path(surrogate_dir)
    meta = io.load_json(surrogate_dir / META)
    step = meta["snapshot_steps"][-1] if step is None else step
    if step not in meta["snapshot_steps"]:
        raise ValueError(f"no snapshot at step {step}; snapshots: {meta['snapshot_steps']}")
    path = surrogate_dir / SNAPSHOTS / _snapshot_name(step, weights)
    if not path.exists():
        raise DataError(
            f"{path} missing: the surrogate has no {weights} snapshot at step {step} (older "
            f"surrogates kept raw weights only); train it again or set scores.weights: raw"
        )
    model = build_model(meta["cfg"], in_channels=meta["in_channels"])
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()
