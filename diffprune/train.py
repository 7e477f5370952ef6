"""Train a diffusion model on the kept subset: one readable loop in the style of DiT's train.py.

Every run takes the same number of optimiser steps (``cfg["steps"]``, the paper's rule), whatever
the subset size. Each step draws ``batch_size`` images uniformly WITH replacement from the subset
(no epochs), plus noise and timesteps, and for a DiT the label dropout, all from a CPU generator
seeded by (seed, step): a step's batch depends on nothing else, which makes resuming exact without
saving sampler state, and N processes train on the same batches as one.

Inputs: uint8 ``images`` (pixel space, resized to train.resolution), or float ``latents`` (N, C, h,
w) as an autoencoder encoded them, which the loop multiplies by ``latent["scale_factor"]``; the
``latent`` record (``{"autoencoder": source, "scale_factor": s}``) goes into train.json, so that
sampling can decode. Either may be a memory map, with ``rows`` the ids of the kept rows: only the
rows in use are read (``diffprune.train_data``).
Class labels: a DiT always gets one per sample; with ``cfg["conditional"]`` it is the row's label
from ``labels`` (``num_classes`` classes), replaced by the null label ``num_classes`` with
probability ``cfg["label_dropout"]`` (classifier-free guidance training); without it, always the
null label (a table of no classes).

Data (``cfg["data_on_device"]``): ``true`` puts the kept subset as model input on the device once;
``false`` keeps it on the host as stored and makes each step's batch there (gather the rows,
convert them with the same function, pin on CUDA, copy without blocking), one step ahead in a
background thread; ``auto`` is true when the model input takes at most 1/4 of the device's free
memory. Both give the same bytes (tested), so the setting does not touch the run key. The loop
syncs with the device only at log and checkpoint steps: every step's draws are made on the host
and copied without blocking.

GPU switches: ``tf32`` (TF32 matrix products and convolutions on CUDA; nothing on CPU),
``fused_adamw`` (torch's fused AdamW: ``auto`` on CUDA only, so CPU runs keep their numbers;
``true`` works on the CPU too since torch 2.4) and ``compile`` (``torch.compile`` of the network for
the loss; EMA, checkpoints and the saved model use the plain module). All three change the
numerics, so they are part of the run key; train.json records what was used.

Checkpoints: every ``checkpoint_every`` steps (and at the last step) the model, EMA, optimizer,
step, torch RNG states, loss history and the run key (hash of the config, seed, image count,
stored image or latent content, scale factor, labels, process count) are written atomically to
``checkpoint_dir/latest.pt``, the one before becoming ``previous.pt`` (``diffprune.checkpoints``).
A new call resumes from the newest readable one when the key matches, else it starts over and
logs why; an unreadable one is moved aside. The checkpoints are deleted once the final model is
written (``keep_checkpoint=True`` keeps them). The main process holds the checkpoint folder's lock
while it trains: a second call for the same run refuses instead of training it concurrently.

Divergence: without a host sync every step, the mean loss is checked at every log step (where it
is synced anyway) and the model and EMA weights before every checkpoint (the last step always
writes one, so this covers the final model too). A non-finite value raises ``TrainingDiverged``
naming the step and the last good checkpoint, which is kept: a checkpoint or model with
non-finite weights is never written.

Output: the EMA weights in diffusers' pipeline layout (``unet/`` or ``transformer/``,
``scheduler/``; a DDPM UNet also gets ``model_index.json`` and loads with
``diffusers.DDPMPipeline.from_pretrained``), plus ``train.json`` (status "ok", cfg, seed, n_images,
steps, wall_seconds, final_loss, device, num_classes, latent, the switches used, ...), written
atomically as one folder. Throughput in train.json: ``images_per_second`` (global, of the steps
this call ran; setup and checkpoint writes, ``checkpoint_seconds``, excluded),
``flops_per_image`` (3x a batch-1 forward counted by FlopCounterMode, ``diffprune.throughput``)
and ``mfu`` against the device's dense bf16 peak, or null when no peak is known (the CPU, an
unlisted GPU), with ``mfu_note`` saying which or why. ``load_model`` reads it back, and refuses a
failed run's folder (``diffprune.status.write_failed_model``).

Multi-GPU: model and optimizer go through ``accelerate.Accelerator.prepare``, so a script that
calls ``train()`` runs data-parallel when started with
``accelerate launch --multi_gpu --num_processes N script.py`` (the train rule does this for
``train.num_processes: N``, see workflow/scripts/train.py; on a machine without CUDA the
processes train on the CPU, gloo backend). ``cfg["batch_size"]`` is the GLOBAL batch: every
process draws the same global batch and trains on its slice (``batch_size / N`` rows), and the
gradients are averaged, so N processes follow one process up to floating-point summation order.
Only the main process logs, calls ``on_snapshot`` and writes checkpoints and the final model; a
checkpoint resumes with the same number of processes. Mixed precision (accelerate's autocast):
``"auto"`` is bf16 on CUDA and off on CPU; the loss itself is computed in float32.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from diffprune import checkpoints, io, machine, train_data
from diffprune.device import resolve_device
from diffprune.diffusion import (
    MODELS,
    build_model,
    build_scheduler,
    disable_label_dropout,
    draw,
    per_sample_loss,
    resolve_config,
    scheduler_class,
)
from diffprune.errors import ConfigError, DataError
from diffprune.status import OK, SUMMARY, model_failure
from diffprune.throughput import TRAIN_FLOPS_PER_FORWARD, device_peak, forward_flops, mfu
from diffprune.train_data import KeptRows, StepPrefetch

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
    (float (N, C, h, w) as encoded, unscaled, with their `latent` record), and write the EMA
    model to `out_dir`. Both may be memory maps: only the rows in use are read.

    A conditional DiT (cfg["conditional"]) needs `labels` (int, one per kept row, in the order of
    `rows`) and `num_classes` (of the whole data set, not only of the kept rows); otherwise both
    are ignored.

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

    # Setup: accelerator (devices, mixed precision, processes) and seeds.
    accelerator = _accelerator(cfg)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if cfg["batch_size"] % world:
        raise ConfigError(
            f"train.batch_size {cfg['batch_size']} must be divisible by the {world} processes"
        )
    local_batch = cfg["batch_size"] // world
    mine = slice(rank * local_batch, (rank + 1) * local_batch)  # this process's rows of a batch
    set_seed(seed)  # python, numpy and torch global RNGs: model initialisation

    # One process at a time trains a run: a rerun refuses while an orphaned job still trains.
    main = accelerator.is_main_process
    lock = checkpoints.run_lock(checkpoint_dir) if main else nullcontext()
    with lock, _tf32(device, cfg["tf32"]) as tf32:
        # Data: the kept subset's model input on the device once, or each step's rows from the
        # host (train.data_on_device); labels stay on the CPU.
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
        n_images = len(data)
        label_table = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        takes_labels = MODELS[cfg["model"]].class_labels
        null = num_classes or 0  # the null label's index: the number of classes

        # Model, EMA, optimizer; the model's FLOPs per training image (for MFU).
        channels, size, _ = data.input_shape
        model = build_model(cfg, in_channels=channels, sample_size=size, num_classes=null)
        model.to(device)
        flops_per_image = _train_flops(model, data.input_shape, device, null, takes_labels)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        scheduler = build_scheduler(cfg)
        fused = cfg["fused_adamw"] is True or (
            cfg["fused_adamw"] == "auto" and device.type == "cuda"
        )
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=fused
        )

        # Resume from the latest checkpoint when it belongs to this run.
        key = _run_key(
            cfg,
            seed=seed,
            data=data,
            labels=labels,
            num_classes=num_classes,
            num_processes=world,
        )
        checkpoint = Path(checkpoint_dir) / CHECKPOINT
        # the main process first: it moves an unreadable checkpoint aside before the others read
        state = checkpoints.load(checkpoint_dir, key) if main else None
        accelerator.wait_for_everyone()
        if not main:
            state = checkpoints.load(checkpoint_dir, key)
        first_step, history, past_seconds, last_good = 0, [], 0.0, None
        if state is not None:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            if accelerator.scaler is not None:
                accelerator.scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
            first_step, history = state["step"], [tuple(row) for row in state["history"]]
            past_seconds, last_good = state["wall_seconds"], state["step"]
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        # the loss goes through the compiled module; EMA, checkpoints and the output see `model`
        forward = torch.compile(model) if cfg["compile"] else model
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "training %s/%s (%d parameters) on %d images for %d steps, global batch %d on %d x %s",
            cfg["model"], cfg["objective"], n_params, n_images, cfg["steps"], cfg["batch_size"],
            world, device,
        )  # fmt: skip

        # Loop. Every process draws the global batch and trains on its own slice of it.
        step_inputs = functools.partial(
            _step_inputs,
            seed=seed,
            batch_size=cfg["batch_size"],
            mine=mine,
            data=data,
            host=device_data is None,
            scheduler=scheduler,
            labels=label_table if takes_labels else None,
            null=null,
            dropout=cfg["label_dropout"] if takes_labels else None,
        )
        steps = range(first_step + 1, cfg["steps"] + 1)
        running, count, loop_start = torch.zeros((), device=device), 0, time.perf_counter()
        saving_seconds = 0.0  # writing checkpoints: not training, left out of the throughput
        with (
            StepPrefetch(step_inputs, steps, device) as batches,
            _live(log_dir, history) if (log_dir is not None and main) else nullcontext() as live,
        ):
            bar = tqdm(
                batches,
                initial=first_step,
                total=cfg["steps"],
                desc="train",
                disable=not (progress and main),
            )
            for step, batch in bar:
                x0 = batch["x0"] if device_data is None else device_data[batch["rows"]]
                loss = per_sample_loss(
                    forward,
                    scheduler,
                    x0,
                    noise=batch["noise"],
                    timesteps=batch["timesteps"],
                    objective=cfg["objective"],
                    class_labels=batch["class_labels"],
                ).mean()
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
                _update_ema(ema, accelerator.unwrap_model(model), decay=_ema_decay(cfg, step))

                running += loss.detach()
                count += 1
                if step % cfg["log_every"] == 0 or step == cfg["steps"]:
                    # a host sync: only at log steps (and checkpoint steps, below)
                    mean_loss = accelerator.reduce(running / count, reduction="mean").item()
                    if not math.isfinite(mean_loss):
                        raise checkpoints.diverged(
                            step,
                            f"mean loss {mean_loss} since step {step - count}",
                            last_good=last_good,
                            checkpoint=checkpoint,
                        )
                    running.zero_()
                    count = 0
                    history.append((step, mean_loss))
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                    log.info("step %d/%d loss %.5f", step, cfg["steps"], mean_loss)
                    if live is not None:
                        _log_loss(live, step, mean_loss)
                if (
                    on_snapshot is not None
                    and snapshot_every
                    and step % snapshot_every == 0
                    and main
                ):
                    on_snapshot(step, accelerator.unwrap_model(model), ema)
                if step % cfg["checkpoint_every"] == 0 or step == cfg["steps"]:
                    # every process checks its own copy (identical weights), so all raise together
                    if not checkpoints.all_finite(accelerator.unwrap_model(model), ema):
                        raise checkpoints.diverged(
                            step,
                            "non-finite model or EMA weights",
                            last_good=last_good,
                            checkpoint=checkpoint,
                        )
                    saving_from = time.perf_counter()  # all_finite synced the device
                    if main:
                        _save_checkpoint(
                            checkpoint_dir,
                            key=key,
                            step=step,
                            model=accelerator.unwrap_model(model),
                            ema=ema,
                            optimizer=optimizer,
                            scaler=accelerator.scaler,
                            history=history,
                            wall_seconds=past_seconds + time.perf_counter() - start_time,
                        )
                    last_good = step
                    accelerator.wait_for_everyone()
                    saving_seconds += time.perf_counter() - saving_from
        loop_seconds = time.perf_counter() - loop_start  # the last step synced (log, checkpoint)

        # Final EMA weights and summary.
        step_seconds = loop_seconds - saving_seconds
        images_per_second = len(steps) * cfg["batch_size"] / step_seconds if steps else None
        peak, mfu_note = device_peak(device)
        summary = {
            "status": OK,
            "cfg": cfg,
            "seed": seed,
            "n_images": n_images,
            f"{data.name}_sha256": key[f"{data.name}_sha256"],
            "num_classes": num_classes,
            "labels_sha256": key["labels_sha256"],
            "latent": latent,
            "steps": cfg["steps"],
            "resumed_from_step": first_step,
            "steps_per_second": len(steps) / step_seconds if steps else None,
            "checkpoint_seconds": saving_seconds,
            "images_per_second": images_per_second,
            "flops_per_image": flops_per_image,
            "mfu": mfu(flops_per_image, images_per_second, peak * world)
            if peak and images_per_second
            else None,
            "mfu_note": mfu_note,
            "wall_seconds": past_seconds + time.perf_counter() - start_time,
            "final_loss": history[-1][1] if history else None,
            "device": str(device),
            "mixed_precision": accelerator.mixed_precision,
            "tf32": tf32,
            "fused_adamw": fused,
            "compile": cfg["compile"],
            "data_on_device": on_device,
            "data_bytes": data.input_bytes,
            "data_free_bytes": free,
            "num_processes": world,
            "parameters": n_params,
            "machine": machine.describe(),
            "code_version": io.code_version(),
        }
        if main:
            save_model(ema, scheduler, out_dir, cfg=cfg, summary=summary)
            if not keep_checkpoint:
                checkpoints.remove(checkpoint_dir)
            log.info("wrote %s (final loss %s)", out_dir, summary["final_loss"])
        accelerator.wait_for_everyone()
        return summary


def save_model(
    model: torch.nn.Module,
    scheduler,
    out_dir: str | os.PathLike,
    *,
    cfg: dict,
    summary: dict[str, Any] | None = None,
) -> None:
    """Write a model folder atomically: diffusers' pipeline layout plus train.json (cfg + summary).

    A UNet trained with DDPM is saved by ``DDPMPipeline.save_pretrained`` itself; other
    combinations get the same layout (``<component>/``, ``scheduler/``) without model_index.json.
    """
    cfg = resolve_config(cfg)
    with io.atomic_path(out_dir, directory=True) as tmp:
        if isinstance(model, UNet2DModel) and isinstance(scheduler, DDPMScheduler):
            DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(tmp)
        else:
            model.save_pretrained(tmp / MODELS[cfg["model"]].subfolder)
            scheduler.save_pretrained(tmp / "scheduler")
        io.save_json(tmp / SUMMARY, {**(summary or {}), "cfg": cfg})


def load_model(model_dir: str | os.PathLike) -> tuple[torch.nn.Module, Any, dict]:
    """(model in eval mode on the CPU, scheduler, train cfg) from a folder written by `train`."""
    model_dir = Path(model_dir)
    if not (model_dir / SUMMARY).is_file():
        raise DataError(
            f"{model_dir} is not a trained model folder (no {SUMMARY}); run train first"
        )
    reason = model_failure(model_dir)
    if reason is not None:
        raise DataError(f"{model_dir} holds no model: its training run failed: {reason}")
    cfg = resolve_config(io.load_json(model_dir / SUMMARY)["cfg"])
    spec = MODELS[cfg["model"]]
    model = disable_label_dropout(spec.cls.from_pretrained(model_dir, subfolder=spec.subfolder))
    scheduler = scheduler_class(cfg["objective"]).from_pretrained(model_dir, subfolder="scheduler")
    return model.eval(), scheduler, cfg


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


def _batch_labels(
    labels: torch.Tensor | None,
    rows: torch.Tensor,
    *,
    null: int,
    dropout: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The class label of each drawn row, replaced by the `null` label with probability `dropout`
    (classifier-free guidance training); all `null` for an unconditional DiT (`labels` None)."""
    if labels is None:
        return torch.full_like(rows, null)
    dropped = torch.rand(rows.shape, generator=generator) < dropout
    return torch.where(dropped, null, labels[rows])


def _accelerator(cfg: dict) -> Accelerator:
    device = resolve_device(cfg["device"], key="train.device")
    precision = cfg["mixed_precision"]
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "no"
    if int(os.environ.get("LOCAL_RANK", -1)) == -1:
        # Not started by a distributed launcher: forget the process-wide state of an earlier call,
        # which accelerate refuses to change, so one process can train with other settings too
        # (as accelerate's own test utilities do).
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=precision, cpu=device.type == "cpu")


@contextmanager
def _tf32(device: torch.device, wanted: bool) -> Iterator[bool]:
    """TF32 matrix products and cuDNN convolutions on CUDA as `wanted`, restored on leaving;
    yields whether they are on (never on other devices, where the switch does nothing)."""
    if device.type != "cuda":
        yield False
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = wanted
    try:
        yield wanted
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _train_flops(
    model: torch.nn.Module,
    shape: tuple[int, int, int],
    device: torch.device,
    null: int,
    takes_labels: bool,
) -> float:
    """Model FLOPs of one training image: a batch-1 forward counted by FlopCounterMode, times
    TRAIN_FLOPS_PER_FORWARD (diffprune.throughput, as benchmarks/gpu_check.py counts)."""
    labels = torch.full((1,), null, device=device) if takes_labels else None
    x, t = torch.zeros((1, *shape), device=device), torch.zeros(1, device=device)
    return TRAIN_FLOPS_PER_FORWARD * forward_flops(model, x, t, class_labels=labels)


def _step_inputs(
    step: int,
    *,
    seed: int,
    batch_size: int,
    mine: slice,
    data: KeptRows,
    host: bool,
    scheduler,
    labels: torch.Tensor | None,
    null: int,
    dropout: float | None,
) -> dict[str, torch.Tensor | None]:
    """One step's draws from the (seed, step) generator, in a fixed order: the global batch's
    rows (uniform, with replacement), noise and timesteps, and for a DiT (`dropout` not None) the
    class labels with dropout. Returns this process's slice (`mine`) of them, CPU tensors, with
    the model input of its rows (`x0`) when `host`, else the rows (positions in `data`)."""
    generator = _step_generator(seed, step)
    rows = torch.randint(0, len(data), (batch_size,), generator=generator)
    # draw() reads only the batch's shape, device and dtype: a stand-in with no storage
    batch = torch.empty(()).expand(batch_size, *data.input_shape)
    noise, timesteps = draw(batch, scheduler, generator=generator)
    class_labels = None
    if dropout is not None:
        dropped = _batch_labels(labels, rows, null=null, dropout=dropout, generator=generator)
        class_labels = dropped[mine]
    inputs = {"noise": noise[mine], "timesteps": timesteps[mine], "class_labels": class_labels}
    if host:
        inputs["x0"] = data.model_input(rows[mine].numpy())
    else:
        inputs["rows"] = rows[mine]
    return inputs


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
    and num_classes (None for an unconditional model), and the number of processes."""
    relevant = {k: v for k, v in cfg.items() if k not in RESUME_NEUTRAL}
    cfg_text = json.dumps(relevant, sort_keys=True)
    return {
        "cfg_sha256": hashlib.sha256(cfg_text.encode()).hexdigest(),
        "seed": seed,
        "n_images": len(data),
        f"{data.name}_sha256": data.sha256(),
        "scale_factor": data.scale,
        "labels_sha256": None if labels is None else _sha256(np.asarray(labels, dtype=np.int64)),
        "num_classes": num_classes,
        "num_processes": num_processes,
    }


def _sha256(array: np.ndarray) -> str:
    """sha256 of an array's shape and C-contiguous bytes (as KeptRows.sha256 of all its rows)."""
    digest = hashlib.sha256(f"{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step). (The 0 in its seed sequence was the
    process index when each process drew its own batch; kept, so one-process runs draw as
    before.)"""
    state = np.random.SeedSequence([seed, 0, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _ema_decay(cfg: dict, step: int) -> float:
    """cfg["ema_decay"] with diffusers EMAModel's default warm-up, (1 + step) / (10 + step): early
    weights fade quickly, which matters for short runs (a 0.995 EMA over 400 steps would
    otherwise still carry the untrained start)."""
    return min(cfg["ema_decay"], (1 + step) / (10 + step))


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, *, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, in two multi-tensor kernels (as torch.optim's
    foreach paths): a per-parameter loop would launch two GPU kernels per tensor every step."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    if len(ema_params) != len(params):
        raise ValueError(f"EMA has {len(ema_params)} parameter tensors, the model {len(params)}")
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


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


def _save_checkpoint(
    directory: str | os.PathLike,
    *,
    key,
    step,
    model,
    ema,
    optimizer,
    scaler,
    history,
    wall_seconds,
) -> None:
    state = {
        "key": key,
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        "history": history,
        "wall_seconds": wall_seconds,
    }
    checkpoints.save(directory, state)


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
