"""Train a diffusion model on the kept subset: one readable loop in the style of DiT's train.py.

Every run takes the same number of optimiser steps (``cfg["steps"]``, the paper's rule), whatever
the subset size. Each step draws ``batch_size`` images uniformly WITH replacement from the subset
(no epochs), plus noise and timesteps, and for a DiT the label dropout, all from a CPU generator
seeded by (seed, step): a step's batch depends on nothing else, which makes resuming exact without
saving sampler state, and N processes train on the same batches as one.

`train` is setup, resume, loop and summary; beside it are the loop's state (`_State`), its steps
(`_train_step`, `_log_step`, `_checkpoint_step`) and the summary record (`_summary`). The run
key, lock, checkpoints and divergence checks are ``diffprune.checkpoints.Run``'s, the same for the
autoencoder and the surrogates; where the data sits is ``diffprune.train_data``'s.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from diffprune import checkpoints, io, machine, train_data
from diffprune.diffusion import (
    MODELS,
    build_model,
    build_scheduler,
    per_sample_loss,
    resolve_config,
)
from diffprune.ema import ema_decay, update_ema
from diffprune.errors import ConfigError, DataError
from diffprune.model_folder import save_model
from diffprune.status import OK
from diffprune.throughput import device_peak, mfu
from diffprune.train_data import KeptRows, StepPrefetch
from diffprune.train_device import accelerator_for, tf32, train_flops

log = logging.getLogger(__name__)

CHECKPOINT = checkpoints.LATEST
# Keys that cannot change the trained weights, so changing them does not invalidate a checkpoint
# (data_on_device: both ways give the same bytes, tested).
RESUME_NEUTRAL = ("checkpoint_every", "log_every", "data_on_device")


def train(
    *,
    images: np.ndarray | None = None,
    latents: np.ndarray | None = None,
    latent: dict[str, Any] | None = None,
    rows: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    num_classes: int | None = None,
    cfg: dict,
    seed: int,
    out_dir: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    log_dir: str | os.PathLike | None = None,
    snapshot_every: int | None = None,
    on_snapshot: Callable[[int, torch.nn.Module, torch.nn.Module], None] | None = None,
    progress: bool = True,
    keep_checkpoint: bool = False,
) -> dict:
    """Train on the kept `rows` (ids; None: all rows) of `images` (uint8 NHWC) or of `latents`
    (float (N, C, h, w) as encoded, unscaled, with their `latent` record, which goes into
    train.json so that sampling can decode), and write the EMA model to `out_dir` (`save_model`).
    Both may be memory maps: only the rows in use are read.

    A conditional DiT (cfg["conditional"]) needs `labels` (int, one per kept row, in the order of
    `rows`) and `num_classes` (of the whole data set, not only of the kept rows); a label is
    replaced by the null label ``num_classes`` with probability cfg["label_dropout"]
    (classifier-free guidance training). An unconditional DiT always gets the null label.

    Every ``checkpoint_every`` steps and at the last one, the state is checkpointed in
    `checkpoint_dir` (`_checkpoint_state`); a new call resumes from it when its key matches
    (`_run_key`), and it is deleted once the model is written unless `keep_checkpoint`.
    `on_snapshot(step, model, ema)` is called with the (unwrapped, training-mode) model and the EMA
    model (eval mode, updated for that step) after every `snapshot_every`-th step, before that
    step's checkpoint is written, so a crash inside it is retried on resume. It must leave both
    models' weights and modes as it found them.
    Returns the train.json summary. Raises `TrainingDiverged` on a non-finite loss or weights.
    """
    start_time = time.perf_counter()
    cfg = resolve_config(cfg)  # every key filled from the schema's defaults, values checked
    data = train_data.kept_rows(images, latents, latent, rows, resolution=cfg["resolution"])
    if cfg["conditional"]:
        _check_labels(labels, num_classes, len(data))
    else:
        labels, num_classes = None, None
    if snapshot_every is not None and snapshot_every < 1:
        raise ValueError(f"snapshot_every must be >= 1 or None, got {snapshot_every}")

    # Setup: accelerator (devices, mixed precision, processes), seeds, data, model, optimizer.
    accelerator = accelerator_for(cfg)
    if cfg["batch_size"] % accelerator.num_processes:
        raise ConfigError(
            f"train.batch_size {cfg['batch_size']} must be divisible by the "
            f"{accelerator.num_processes} processes"
        )
    set_seed(seed)  # python, numpy and torch global RNGs: model initialisation
    main = accelerator.is_main_process
    # One process at a time trains a run: a rerun refuses while an orphaned job still trains.
    run = checkpoints.Run(checkpoint_dir, main=main)
    with run.lock(), tf32(accelerator.device, cfg["tf32"]) as tf32_on:
        state = _setup(cfg, data, accelerator, run, num_classes=num_classes, tf32=tf32_on)

        # Resume from the latest checkpoint when it belongs to this run.
        key = _run_key(
            cfg,
            seed=seed,
            data=data,
            labels=labels,
            num_classes=num_classes,
            num_processes=accelerator.num_processes,
        )
        _resume(state, key)
        state.model, state.optimizer = accelerator.prepare(state.model, state.optimizer)
        state.model.train()
        # the loss goes through the compiled module; EMA, checkpoints and the output see `model`
        forward = torch.compile(state.model) if cfg["compile"] else state.model
        log.info(
            "training %s/%s (%d parameters) on %d images for %d steps, global batch %d on %d x %s",
            cfg["model"], cfg["objective"], state.n_params, len(data), cfg["steps"],
            cfg["batch_size"], accelerator.num_processes, accelerator.device,
        )  # fmt: skip

        # Loop. Every process draws the global batch and trains on its own slice of it.
        steps = range(state.first_step + 1, cfg["steps"] + 1)
        step_inputs = _step_draws(state, data, seed=seed, labels=labels)
        snapshots = on_snapshot is not None and snapshot_every and main
        loop_start = time.perf_counter()
        with (
            StepPrefetch(step_inputs, steps, accelerator.device) as batches,
            _live(log_dir, state.history)
            if (log_dir is not None and main)
            else nullcontext() as live,
        ):
            bar = tqdm(
                batches,
                initial=state.first_step,
                total=cfg["steps"],
                desc="train",
                disable=not (progress and main),
            )
            for step, batch in bar:
                _train_step(state, forward, batch, step)
                if step % cfg["log_every"] == 0 or step == cfg["steps"]:
                    _log_step(state, step, bar, live)
                if snapshots and step % snapshot_every == 0:
                    on_snapshot(step, state.raw_model, state.ema)
                if step % cfg["checkpoint_every"] == 0 or step == cfg["steps"]:
                    _checkpoint_step(state, step, start_time)
        loop_seconds = time.perf_counter() - loop_start  # the last step synced (log, checkpoint)

        # Final EMA weights and summary.
        summary = _summary(
            state, data, seed=seed, key=key, latent=latent, num_classes=num_classes,
            steps=len(steps), loop_seconds=loop_seconds, start_time=start_time,
        )  # fmt: skip
        if main:
            save_model(state.ema, state.scheduler, out_dir, cfg=cfg, summary=summary)
            run.finish(keep=keep_checkpoint)
            log.info("wrote %s (final loss %s)", out_dir, summary["final_loss"])
        accelerator.wait_for_everyone()
        return summary


@dataclass
class _State:
    """What the loop trains and keeps: the models, optimizer and scheduler, the run, the loss
    history and the running loss since the last log step, and what setup measured."""

    cfg: dict
    accelerator: Accelerator
    run: checkpoints.Run
    model: torch.nn.Module  # wrapped by accelerate.prepare once resumed
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device_data: torch.Tensor | None  # the kept rows' model input on the device, or None
    on_device: bool
    free: int | None
    null: int  # the null label: the number of classes (0 without)
    fused: bool
    tf32: bool
    flops_per_image: float
    n_params: int
    running: torch.Tensor
    count: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)
    first_step: int = 0
    past_seconds: float = 0.0
    saving_seconds: float = 0.0  # writing checkpoints: not training, left out of the throughput

    @property
    def raw_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)


def _setup(
    cfg: dict,
    data: KeptRows,
    accelerator: Accelerator,
    run: checkpoints.Run,
    *,
    num_classes: int | None,
    tf32: bool,
) -> _State:
    """The data placed (train.data_on_device: on the device once, or each step's rows from the
    host; both give the same bytes), the model built from the global RNG, its EMA copy and the
    optimizer (torch's fused AdamW for fused_adamw true, or "auto" on CUDA only, so CPU runs
    keep their numbers)."""
    device, world = accelerator.device, accelerator.num_processes
    copies = world if device.type == "cpu" else 1  # CPU processes share the host's memory
    on_device, free = train_data.on_device(
        cfg["data_on_device"], data.input_bytes, device, copies=copies
    )
    log.info(
        "data: %d %s, %.1f MiB as model input, %s (data_on_device %s%s)",
        len(data), data.name, data.input_bytes / 2**20,
        f"on {device}" if on_device else "gathered on the host every step",
        cfg["data_on_device"], "" if free is None else f", {free / 2**20:.0f} MiB free",
    )  # fmt: skip
    device_data = data.to_device(device) if on_device else None
    null = num_classes or 0  # the null label's index: the number of classes
    channels, size, _ = data.input_shape
    model = build_model(cfg, in_channels=channels, sample_size=size, num_classes=null)
    model.to(device)
    takes_labels = MODELS[cfg["model"]].class_labels
    flops_per_image = train_flops(model, data.input_shape, device, null, takes_labels)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    fused = cfg["fused_adamw"] is True or (cfg["fused_adamw"] == "auto" and device.type == "cuda")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=fused
    )
    return _State(
        cfg=cfg, accelerator=accelerator, run=run, model=model, ema=ema, optimizer=optimizer,
        scheduler=build_scheduler(cfg), device_data=device_data, on_device=on_device, free=free,
        null=null, fused=fused, tf32=tf32, flops_per_image=flops_per_image,
        n_params=sum(p.numel() for p in model.parameters()),
        running=torch.zeros((), device=device),
    )  # fmt: skip


def _resume(state: _State, key: dict) -> None:
    """Load the run's checkpoint for `key` into `state`, if there is one. The main process reads
    first: it moves an unreadable checkpoint aside before the others read."""
    checkpoint = state.run.resume(key) if state.run.main else None
    state.accelerator.wait_for_everyone()
    if not state.run.main:
        checkpoint = state.run.resume(key)
    if checkpoint is None:
        return
    state.model.load_state_dict(checkpoint["model"])
    state.ema.load_state_dict(checkpoint["ema"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    if state.accelerator.scaler is not None:
        state.accelerator.scaler.load_state_dict(checkpoint["scaler"])
    _set_rng_state(checkpoint["rng"])
    state.first_step = checkpoint["step"]
    state.history = [tuple(row) for row in checkpoint["history"]]
    running, state.count = checkpoint.get("loss_window", (0.0, 0))  # older checkpoints: none
    state.running.fill_(running)
    state.past_seconds = checkpoint["wall_seconds"]


def _step_draws(
    state: _State, data: KeptRows, *, seed: int, labels: np.ndarray | None
) -> Callable[[int], dict[str, torch.Tensor | None]]:
    """`train_data.step_inputs` for this process: step -> its slice of the step's global batch."""
    cfg, accelerator = state.cfg, state.accelerator
    local_batch = cfg["batch_size"] // accelerator.num_processes
    rank = accelerator.process_index
    takes_labels = MODELS[cfg["model"]].class_labels
    label_table = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
    return functools.partial(
        train_data.step_inputs,
        seed=seed,
        batch_size=cfg["batch_size"],
        mine=slice(rank * local_batch, (rank + 1) * local_batch),
        data=data,
        host=state.device_data is None,
        scheduler=state.scheduler,
        labels=label_table if takes_labels else None,
        null=state.null,
        dropout=cfg["label_dropout"] if takes_labels else None,
    )


def _train_step(state: _State, forward: Callable, batch: dict, step: int) -> None:
    """One optimiser step on the batch, then the EMA update; the loss is added to the running
    sum on the device (no host sync)."""
    x0 = batch["x0"] if state.device_data is None else state.device_data[batch["rows"]]
    loss = per_sample_loss(
        forward,
        state.scheduler,
        x0,
        noise=batch["noise"],
        timesteps=batch["timesteps"],
        objective=state.cfg["objective"],
        class_labels=batch["class_labels"],
    ).mean()
    state.optimizer.zero_grad(set_to_none=True)
    state.accelerator.backward(loss)
    state.optimizer.step()
    update_ema(state.ema, state.raw_model, decay=ema_decay(state.cfg, step))
    state.running += loss.detach()
    state.count += 1


def _log_step(state: _State, step: int, bar: Any, live: Any) -> None:
    """The mean loss since the last log step, over all processes (a host sync: only here and at
    checkpoints), checked, recorded and shown."""
    mean_loss = state.accelerator.reduce(state.running / state.count, reduction="mean").item()
    state.run.check_loss(step, mean_loss, since=step - state.count)
    state.running.zero_()
    state.count = 0
    state.history.append((step, mean_loss))
    bar.set_postfix(loss=f"{mean_loss:.4f}")
    log.info("step %d/%d loss %.5f", step, state.cfg["steps"], mean_loss)
    if live is not None:
        _log_loss(live, step, mean_loss)


def _checkpoint_step(state: _State, step: int, start_time: float) -> None:
    """Check the weights (every process its own copy, identical, so all raise together) and
    write the checkpoint (the main process); its seconds are left out of the throughput."""
    state.run.check_weights(
        step, state.raw_model, state.ema, what="non-finite model or EMA weights"
    )
    saving_from = time.perf_counter()  # the check synced the device
    wall_seconds = state.past_seconds + saving_from - start_time
    # the loss summed since the last log step, over all processes: a resumed run logs the mean
    # of the same steps as an uninterrupted one
    window = (state.accelerator.reduce(state.running, reduction="mean").item(), state.count)
    state.run.save(step, lambda: _checkpoint_state(state, wall_seconds=wall_seconds, window=window))
    state.accelerator.wait_for_everyone()
    state.saving_seconds += time.perf_counter() - saving_from


def _check_labels(labels: np.ndarray | None, num_classes: int | None, n: int) -> None:
    if labels is None or num_classes is None:
        raise ConfigError("train.conditional needs the rows' labels and num_classes")
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"labels must be integers, one per row ({n}), got {labels.dtype}{labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(
            f"labels must be in [0, num_classes={num_classes}), got {labels.min()}..{labels.max()}"
        )


def _run_key(
    cfg: dict,
    *,
    seed: int,
    data: KeptRows,
    labels: np.ndarray | None,
    num_classes: int | None,
    num_processes: int,
) -> dict:
    """What a checkpoint must match to be resumed: the config (all but RESUME_NEUTRAL, so tf32,
    fused_adamw and compile count: they change the numerics), seed, the kept rows as stored
    (images_sha256 or latents_sha256) and the latents' scale factor (None for images), labels
    and num_classes (None for an unconditional model), and the number of processes (a checkpoint
    resumes with as many)."""
    return checkpoints.run_key(
        cfg,
        neutral=RESUME_NEUTRAL,
        seed=seed,
        n_images=len(data),
        **{f"{data.name}_sha256": data.sha256()},
        scale_factor=data.scale,
        labels_sha256=None
        if labels is None
        else checkpoints.array_sha256(np.asarray(labels, dtype=np.int64)),
        num_classes=num_classes,
        num_processes=num_processes,
    )


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    """Global RNGs are not used by the loop itself; restored so that modules with dropout resume
    exactly too."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint_state(
    state: _State, *, wall_seconds: float, window: tuple[float, int]
) -> dict[str, Any]:
    """A checkpoint's content beside its key and step: model, EMA, optimizer, grad scaler, torch
    RNG states, loss history, the loss window since the last log step (sum, steps) and the wall
    seconds so far."""
    scaler = state.accelerator.scaler
    return {
        "model": state.raw_model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        "history": state.history,
        "loss_window": list(window),
        "wall_seconds": wall_seconds,
    }


def _summary(
    state: _State,
    data: KeptRows,
    *,
    seed: int,
    key: dict,
    latent: dict[str, Any] | None,
    num_classes: int | None,
    steps: int,
    loop_seconds: float,
    start_time: float,
) -> dict[str, Any]:
    """train.json's record: status "ok", cfg, seed, data and label hashes, the latent record,
    final loss, device, the switches used, and throughput: ``images_per_second`` (global, of the
    `steps` this call ran; setup and checkpoint writes, ``checkpoint_seconds``, excluded),
    ``flops_per_image`` (3x a batch-1 forward counted by FlopCounterMode,
    ``diffprune.throughput``) and ``mfu`` against the device's dense bf16 peak, or null when no
    peak is known (the CPU, an unlisted GPU), with ``mfu_note`` saying which or why."""
    cfg, accelerator, device = state.cfg, state.accelerator, state.accelerator.device
    step_seconds = loop_seconds - state.saving_seconds
    images_per_second = steps * cfg["batch_size"] / step_seconds if steps else None
    peak, mfu_note = device_peak(device)
    achieved = peak and images_per_second
    world = accelerator.num_processes
    return {
        "status": OK,
        "cfg": cfg,
        "seed": seed,
        "n_images": len(data),
        f"{data.name}_sha256": key[f"{data.name}_sha256"],
        "num_classes": num_classes,
        "labels_sha256": key["labels_sha256"],
        "latent": latent,
        "steps": cfg["steps"],
        "resumed_from_step": state.first_step,
        "steps_per_second": steps / step_seconds if steps else None,
        "checkpoint_seconds": state.saving_seconds,
        "images_per_second": images_per_second,
        "flops_per_image": state.flops_per_image,
        "mfu": mfu(state.flops_per_image, images_per_second, peak * world) if achieved else None,
        "mfu_note": mfu_note,
        "wall_seconds": state.past_seconds + time.perf_counter() - start_time,
        "final_loss": state.history[-1][1] if state.history else None,
        "device": str(device),
        "mixed_precision": accelerator.mixed_precision,
        "tf32": state.tf32,
        "fused_adamw": state.fused,
        "compile": cfg["compile"],
        "data_on_device": state.on_device,
        "data_bytes": data.input_bytes,
        "data_free_bytes": state.free,
        "num_processes": world,
        "parameters": state.n_params,
        "machine": machine.describe(),
        "code_version": io.code_version(),
    }


def _live(log_dir: str | os.PathLike, history: list[tuple[int, float]]) -> Any:
    """A fresh dvclive folder, with the loss history of a resumed run replayed into it. (dvclive
    is imported here: a run without a log folder, such as the GPU check's, does not need it.)"""
    from dvclive import Live

    live = Live(dir=str(log_dir), save_dvc_exp=False, dvcyaml=None)
    for step, loss in history:
        _log_loss(live, step, loss)
    return live


def _log_loss(live: Any, step: int, loss: float) -> None:
    live.step = step
    live.log_metric("loss", loss)
    live.make_summary()
