"""The training loop's device setup: accelerate's Accelerator (devices, processes, mixed
precision), the TF32 switch and the model FLOPs per training image (for MFU)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from diffprune.device import resolve_device
from diffprune.throughput import TRAIN_FLOPS_PER_FORWARD, forward_flops


def accelerator_for(cfg: dict) -> Accelerator:
    """The accelerate Accelerator for cfg's device and mixed precision ("auto": bf16 on CUDA, off
    on the CPU; the loss itself is computed in float32).

    Model and optimizer go through its ``prepare``, so a script that calls diffprune.train.train
    runs data-parallel when started with ``accelerate launch --multi_gpu --num_processes N`` (the
    train rule does this for ``train.num_processes: N``, see workflow/scripts/train.py; without
    CUDA the processes train on the CPU, gloo backend). ``cfg["batch_size"]`` is the GLOBAL
    batch: every process draws the same global batch and trains on its slice, and the gradients
    are averaged, so N processes follow one process up to floating-point summation order. Only
    the main process logs, calls ``on_snapshot`` and writes checkpoints and the final model."""
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
def tf32(device: torch.device, wanted: bool) -> Iterator[bool]:
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


def train_flops(
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
