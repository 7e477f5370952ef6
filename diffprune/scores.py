"""Score-based selection rules: EL2N, GraNd, forgetting and MoSo analogues for diffusion models.

Every score is a float64 array with one value per sample, in sample_id order, and HIGHER = KEEP
(diffprune.select keeps the highest by default, the lowest for "-inverse"). Scores read the
snapshots of a surrogate trained by diffprune.surrogate; every per-sample loss uses that sample's
fixed (seeded) noise and timestep, so the numbers do not depend on batch size, order or device.
EL2N and GraNd take a fixed timestep for every sample by default (params `scores.timestep`, the
reference's t = 15 of 1000), so they rank samples rather than the timestep each one happened to
draw, and score the EMA weights of the surrogate's last snapshot (`scores.weights`).

Per-sample gradients are taken with torch.func (functional_call + vmap(grad)) over chunks of
`batch_size` samples: each vmapped call sees a batch of one, which is exactly the reference's
batch-size-1 loop (`grand_loop`) but batched. Memory per chunk is about batch_size x parameters x
4 bytes. MoSo never holds more than one chunk of per-sample gradients: a first pass takes the mean
gradient (ordinary backward of the summed loss), a second pass the per-sample terms.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from diffprune import io
from diffprune.batches import resolve_num_workers
from diffprune.defaults import with_defaults
from diffprune.device import resolve_device
from diffprune.diffusion import build_scheduler, per_sample_loss
from diffprune.draws import Draws, losses_under, scoring_batches
from diffprune.errors import DataError
from diffprune.names import ROW_SCORES, SCORES
from diffprune.shards import gather_meta
from diffprune.surrogate import (
    LOSSES,
    META,
    MOSO_META,
    SUBSETS,
    WEIGHTS,
    images_sha256,
    load_snapshot,
)

log = logging.getLogger(__name__)

# Keys that say how the stage is split into jobs, not what it computes: left out of the record,
# so the record of N shards is the record of one job.
LAYOUT_KEYS = ("shards",)


def el2n(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    cfg: dict,
    seed: int = 0,
    draws: int = 1,
    timestep: int | None = None,
    sample_ids: np.ndarray | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """EL2N analogue: the per-sample diffusion loss, averaged over `draws` seeded (t, noise) draws.

    Draw d of sample i is seeded by (seed, sample_id, d), so draws=1 is the paper's "one draw of
    t and noise per sample"; more draws lower the variance of a score that is otherwise dominated
    by the random t. `timestep` (a DDPM-style index, diffusion.fixed_timestep) fixes t for every
    sample, as the reference does; draws then differ in the noise only.
    `cfg` is the train config the model was built from.
    """
    setting = Draws(seed, 0, timestep, batch_size, num_workers, progress)
    return el2n_under(model, images, cfg=cfg, draws=setting, count=draws, sample_ids=sample_ids)


def el2n_under(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    cfg: dict,
    draws: Draws,
    count: int = 1,
    sample_ids: np.ndarray | None = None,
) -> np.ndarray:
    """`el2n` with its draws as one value: the mean loss over draw indices 0 .. count - 1."""
    if count < 1:
        raise ValueError(f"draws must be >= 1, got {count}")
    total = np.zeros(len(images), dtype=np.float64)
    for d in range(count):
        total += losses_under(
            model, images, cfg=cfg, draws=draws.with_(draw_index=d), sample_ids=sample_ids
        )
    return total / count


class _Functional:
    """`module` called with explicit parameters and buffers (torch.func.functional_call).

    Lets diffusion.per_sample_loss, which takes a model, run inside vmap(grad(...)); attribute
    reads (config, dtype) go to the real module.
    """

    def __init__(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor]):
        self._module, self._tensors = module, tensors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._module, self._tensors, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def per_sample_grad_stats(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    cfg: dict,
    draws: Draws,
    reference: dict[str, torch.Tensor] | None = None,
    sample_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """|g_i|^2 and <reference, g_i> for every sample: g_i is the gradient of sample i's loss (its
    fixed draw, with t fixed to draws.timestep if given) w.r.t. ALL parameters of `model`.

    Returns float64 arrays (N,); the second is None without a `reference` (name -> tensor).
    """
    scheduler = build_scheduler(cfg)
    objective = cfg["objective"]
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    if reference is not None:
        reference = {name: reference[name].to(p) for name, p in params.items()}

    def loss_one(p: dict[str, torch.Tensor], x0, noise, t) -> torch.Tensor:
        fmodel = _Functional(model, {**p, **buffers})
        loss = per_sample_loss(
            fmodel, scheduler, x0[None], noise=noise[None], timesteps=t[None], objective=objective
        )
        return loss[0]

    per_sample_grads = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))
    sq = np.empty(len(images), dtype=np.float64)
    dots = None if reference is None else np.empty(len(images), dtype=np.float64)
    with warnings.catch_warnings():
        # Attention has no vmap batching rule on CPU; torch falls back to a loop and says so.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        for rows, x0, noise, t in scoring_batches(
            model, images, cfg=cfg, scheduler=scheduler, draws=draws, sample_ids=sample_ids,
            desc="per-sample gradients",
        ):  # fmt: skip
            grads = per_sample_grads(params, x0, noise, t)
            flat = {name: g.flatten(1) for name, g in grads.items()}
            sq[rows] = _sum64(g.pow(2).sum(1) for g in flat.values())
            if reference is not None:
                dots[rows] = _sum64(flat[name] @ ref.flatten() for name, ref in reference.items())
            del grads, flat
    return sq, dots


def _sum64(parts: Any) -> np.ndarray:
    """Sum per-parameter (B,) partial results in float64."""
    return sum(part.double().cpu().numpy() for part in parts)


def grand(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    cfg: dict,
    seed: int = 0,
    timestep: int | None = None,
    sample_ids: np.ndarray | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """GraNd analogue: L2 norm of the per-sample loss gradient over all parameters (batched).

    `timestep` fixes t for every sample as in `el2n`."""
    draws = Draws(seed, 0, timestep, batch_size, num_workers, progress)
    return grand_under(model, images, cfg=cfg, draws=draws, sample_ids=sample_ids)


def grand_under(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    cfg: dict,
    draws: Draws,
    sample_ids: np.ndarray | None = None,
) -> np.ndarray:
    """`grand` with its draws as one value."""
    sq, _ = per_sample_grad_stats(model, images, cfg=cfg, draws=draws, sample_ids=sample_ids)
    return np.sqrt(sq)


def grand_loop(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    cfg: dict,
    seed: int = 0,
    timestep: int | None = None,
    sample_ids: np.ndarray | None = None,
    progress: bool = True,
) -> np.ndarray:
    """GraNd the reference's way: one backward pass per sample (batch size 1). For checking."""
    scheduler = build_scheduler(cfg)
    params = list(model.parameters())
    out = np.empty(len(images), dtype=np.float64)
    draws = Draws(seed=seed, timestep=timestep, batch_size=1, progress=progress)
    for rows, x0, noise, t in scoring_batches(
        model, images, cfg=cfg, scheduler=scheduler, draws=draws, sample_ids=sample_ids,
        desc="GraNd (loop)",
    ):  # fmt: skip
        loss = per_sample_loss(
            model, scheduler, x0, noise=noise, timesteps=t, objective=cfg["objective"]
        )[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out[rows] = np.sqrt(_sum64(g.pow(2).sum()[None] for g in grads if g is not None))
    return out


def mean_gradient(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    cfg: dict,
    draws: Draws,
    sample_ids: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """g = mean over samples of the per-sample gradients, as parameter name -> tensor.

    The loss is per sample (no batch statistics in the model), so the gradient of the summed
    batch loss is the sum of the per-sample gradients: one ordinary backward pass per batch.
    """
    scheduler = build_scheduler(cfg)
    names, params = zip(*model.named_parameters(), strict=True)
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for _, x0, noise, t in scoring_batches(
        model, images, cfg=cfg, scheduler=scheduler, draws=draws, sample_ids=sample_ids,
        desc="mean gradient",
    ):  # fmt: skip
        loss = per_sample_loss(
            model, scheduler, x0, noise=noise, timesteps=t, objective=cfg["objective"]
        ).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, g in zip(total, grads, strict=True):
            if g is not None:
                acc += g.double()
    return {
        name: (acc / len(images)).to(p.dtype)
        for name, acc, p in zip(names, total, params, strict=True)
    }


def moso_formula(sq_norms: np.ndarray, dots: np.ndarray, mean_sq: float, n: int) -> np.ndarray:
    """MoSo's first-order score for each sample of a subset of size n (Tan et al. 2023):

    (2n-3)/(n-1)^2 |g|^2 - 1/(n-1)^2 |g_i|^2 + (2n-4)/(n-1)^2 <g - g_i/n, g_i>,
    from |g_i|^2 (sq_norms), <g, g_i> (dots) and |g|^2 (mean_sq); <g - g_i/n, g_i> is expanded to
    <g, g_i> - |g_i|^2/n.
    """
    if n < 2:
        raise ValueError(f"MoSo needs a subset of >= 2 samples, got n={n}")
    inner = dots - sq_norms / n
    return ((2 * n - 3) * mean_sq - sq_norms + (2 * n - 4) * inner) / (n - 1) ** 2


def moso(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    cfg: dict,
    seed: int = 0,
    sample_ids: np.ndarray | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """MoSo score of every sample of one subset (`images`) at one snapshot (`model`).

    Two streaming passes: the subset's mean gradient g, then |g_i|^2 and <g, g_i> per chunk, so no
    (N, parameters) matrix is ever held. compute_scores sums this over snapshots.
    """
    draws = Draws(seed=seed, batch_size=batch_size, num_workers=num_workers, progress=progress)
    return moso_under(model, images, cfg=cfg, draws=draws, sample_ids=sample_ids)


def moso_under(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    cfg: dict,
    draws: Draws,
    sample_ids: np.ndarray | None = None,
) -> np.ndarray:
    """`moso` with its draws as one value (the random t of each sample: draws.timestep is None)."""
    common = {"cfg": cfg, "draws": draws, "sample_ids": sample_ids}
    g = mean_gradient(model, images, **common)
    mean_sq = float(sum(v.double().pow(2).sum().item() for v in g.values()))
    sq, dots = per_sample_grad_stats(model, images, reference=g, **common)
    return moso_formula(sq, dots, mean_sq, len(images))


def forgetting(losses: np.ndarray) -> np.ndarray:
    """Forgetting analogue: per sample, the fraction of consecutive loss records where it went up.

    `losses` is (num_records, N), records in training order (surrogate's losses.npy). Scores are
    in sample order; with R records they take only the values k/(R-1), so ties are common and the
    selection's tie-break matters (it must not be the sample index).
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[0] < 2:
        raise ValueError(f"losses must be (num_records >= 2, N), got shape {losses.shape}")
    return (np.diff(losses, axis=0) > 0).mean(axis=0)


def compute_scores(
    name: str,
    *,
    surrogate_dir: str | os.PathLike,
    images: np.ndarray,
    cfg: dict | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    rows: range | None = None,
) -> tuple[np.ndarray, dict]:
    """Scores of every training sample for one score-based rule, and a JSON-able info record.

    surrogate_dir: the full-data surrogate (train_surrogate) for el2n / grand / forgetting, the
    MoSo folder (train_moso_surrogates) for moso. images: the surrogate's training images (uint8
    NHWC, checked by hash). cfg: params["scores"] (absent keys: the schema's defaults); `timestep`
    and `weights` apply to el2n and grand only (forgetting reads the raw-weight loss records, MoSo
    the raw weights with one random draw per sample). seed: the per-sample draws. Returns
    (float64 (N,), info) where info["seconds"] is what the scores cost in all: surrogate training
    plus scoring (info["gpu_seconds"]: the part run on one GPU). rows: one shard's rows (el2n and
    grand only, scores.shards): their scores, with `rows` in the record.
    """
    if name not in SCORES:
        raise ValueError(f"unknown score {name!r}; choose one of {', '.join(SCORES)}")
    if rows is not None and name not in ROW_SCORES:
        raise ValueError(f"{name} scores are not sharded; only {', '.join(ROW_SCORES)} are")
    cfg = with_defaults("scores", cfg)
    if cfg["weights"] not in WEIGHTS:
        raise ValueError(f"scores.weights = {cfg['weights']!r}: choose one of {', '.join(WEIGHTS)}")
    surrogate_dir = Path(surrogate_dir)
    meta_path = surrogate_dir / (MOSO_META if name == "moso" else META)
    if not meta_path.exists():
        raise DataError(f"no surrogate at {surrogate_dir}: {meta_path.name} missing")
    meta = io.load_json(meta_path)
    if meta["images_sha256"] != images_sha256(images):
        raise DataError(
            f"images ({len(images)}) are not the ones the surrogate in {surrogate_dir} was "
            f"trained on ({meta['n']}); pass its training images or retrain it"
        )
    device = resolve_device(device)
    num_workers = resolve_num_workers(cfg["num_workers"], device, key="scores.num_workers")
    start = time.perf_counter()
    draws = Draws(seed=seed, batch_size=batch_size, num_workers=num_workers, progress=progress)
    if name == "forgetting":
        if not (surrogate_dir / LOSSES).exists():
            raise DataError(f"{surrogate_dir} has no {LOSSES}; train it with record_losses=True")
        scores = forgetting(np.load(surrogate_dir / LOSSES))
    elif name == "moso":
        scores = _moso_all(surrogate_dir, images, draws=draws, device=device)
    else:
        scores = _row_scores(name, surrogate_dir, images, cfg, meta, draws, device, rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    scoring = time.perf_counter() - start
    log.info("%s scores of %d samples in %.1f s", name, len(scores), scoring)
    info = {
        "score": name,
        "n": len(scores),
        "seed": seed,
        "batch_size": batch_size,
        "params": {k: v for k, v in cfg.items() if k not in LAYOUT_KEYS},
        "device": str(device),
        "num_workers": num_workers,
        "surrogate_seconds": meta["seconds"],
        "scoring_seconds": scoring,
        "seconds": meta["seconds"] + scoring,
        "gpu_seconds": meta["gpu_seconds"] + (scoring if device.type == "cuda" else 0.0),
        "code_version": io.code_version(),
    }
    return scores, info if rows is None else {**info, "rows": [rows.start, rows.stop]}


def _row_scores(
    name: str,
    surrogate_dir: Path,
    images: np.ndarray,
    cfg: dict,
    meta: dict,
    draws: Draws,
    device: torch.device,
    rows: range | None,
) -> np.ndarray:
    """EL2N or GraNd of `images[rows]` (all rows when None): each row keeps its sample id, so its
    draw, and with whole batches its very batch, is the one the unsharded job uses."""
    rows = range(len(images)) if rows is None else rows
    part = images if len(rows) == len(images) else images[rows.start : rows.stop]
    model = load_snapshot(surrogate_dir, weights=cfg["weights"], device=device)
    at = {
        "cfg": meta["cfg"],
        "draws": draws.with_(timestep=cfg["timestep"]),
        "sample_ids": np.arange(rows.start, rows.stop),
    }
    if name == "el2n":
        return el2n_under(model, part, count=cfg["el2n_draws"], **at)
    return grand_under(model, part, **at)


def gather_info(infos: list[dict]) -> dict:
    """The record of the unsharded job from its shards' (diffprune.shards.gather_meta): scoring
    time summed over the shards, the surrogate's time counted once."""
    info = gather_meta(infos, summed=("scoring_seconds", "seconds", "gpu_seconds"))
    first = infos[0]
    cuda = first["device"].startswith("cuda")
    surrogate_gpu = first["gpu_seconds"] - (first["scoring_seconds"] if cuda else 0.0)
    info["seconds"] = info["surrogate_seconds"] + info["scoring_seconds"]
    info["gpu_seconds"] = surrogate_gpu + (info["scoring_seconds"] if cuda else 0.0)
    return info


def _moso_all(
    moso_dir: Path,
    images: np.ndarray,
    *,
    draws: Draws,
    device: torch.device,
) -> np.ndarray:
    """MoSo of every sample: scored in its own subset by that subset's surrogate, summed over the
    surrogate's snapshots."""
    subsets = np.load(moso_dir / SUBSETS)
    scores = np.zeros(len(images), dtype=np.float64)
    quiet = draws.with_(progress=False)
    bar = tqdm(range(int(subsets.max()) + 1), desc="MoSo subsets", disable=not draws.progress)
    for k in bar:
        sub_dir = moso_dir / f"subset_{k}"
        sub_meta = io.load_json(sub_dir / META)
        ids = np.flatnonzero(subsets == k)
        subset_images = np.asarray(images[ids])
        for step in sub_meta["snapshot_steps"]:
            model = load_snapshot(sub_dir, step, device=device)
            scores[ids] += moso_under(
                model, subset_images, cfg=sub_meta["cfg"], draws=quiet, sample_ids=ids
            )
    return scores
