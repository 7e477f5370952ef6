"""The training loop's data: the kept rows as the network sees them, on the device or from the host.

`KeptRows` is a stored array (uint8 images (N,H,W,C), or float latents (N,C,h,w) as the encode
stage wrote them; a memory map is fine) plus the ids of the kept rows. Nothing is read until a
chunk or a batch is asked for, so the kept subset is never held in memory as a whole unless it
goes on the device. `KeptRows.model_input` is the ONE conversion to the network's input, float32
(B,C,S,S): `to_model_input` for images, float32 times the autoencoder's scale factor for latents.
It treats every row on its own, so converting all rows once (`to_device`, chunk by chunk) and
converting each step's rows (`StepPrefetch` with the data on the host) give the same bytes, and
so does the training (tests/test_train.py).

`on_device` decides `train.data_on_device: auto`: the model input goes on the device when its
bytes are at most `DEVICE_SHARE` of the device's free memory (CUDA: torch.cuda.mem_get_info; CPU:
MemAvailable of /proc/meminfo, shared by the run's processes, which each hold a copy).

`StepPrefetch` makes each step's inputs one step ahead in a background thread, while the device
trains on the step before; on CUDA they are pinned and copied without blocking, so the loop
never waits for the device to finish its queued work.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffprune.checkpoints import step_generator
from diffprune.data import to_model_input
from diffprune.diffusion import draw
from diffprune.errors import DataError

#: Stored bytes read at a time to hash the kept rows or to put them on the device.
CHUNK_BYTES = 64 * 2**20
#: `data_on_device: auto` puts the model input on the device up to this share of its free memory.
DEVICE_SHARE = 0.25

Inputs = dict[str, torch.Tensor | None]


@dataclass(frozen=True)
class KeptRows:
    """`source[rows]` (a stored array's kept rows, `rows` int64 ids) without reading it.

    `resolution` (images): the network's input size; `scale` (latents): the autoencoder's scale
    factor. Exactly one of them is set."""

    source: np.ndarray
    rows: np.ndarray
    resolution: int | None = None
    scale: float | None = None

    @property
    def name(self) -> str:
        """What the rows are, "images" or "latents" (train.json's `<name>_sha256`)."""
        return "images" if self.scale is None else "latents"

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, S, S) of one row as the network sees it."""
        if self.scale is None:
            return (self.source.shape[-1], self.resolution, self.resolution)
        return tuple(self.source.shape[1:])

    @property
    def input_bytes(self) -> int:
        """Bytes of the whole model input (float32)."""
        return len(self) * math.prod(self.input_shape) * 4

    def model_input(self, positions: np.ndarray) -> torch.Tensor:
        """float32 (B,C,S,S) on the CPU: the network's input for the kept rows at `positions`
        (0 .. len - 1, repeats allowed); reads only those rows."""
        stored = self.source[self.rows[positions]]
        if self.scale is None:
            return to_model_input(stored, self.resolution)
        return torch.from_numpy(np.asarray(stored, dtype=np.float32) * self.scale)

    def chunks(self) -> Iterator[slice]:
        """Consecutive positions, about CHUNK_BYTES of stored rows each."""
        row_bytes = math.prod(self.source.shape[1:]) * self.source.dtype.itemsize
        step = max(1, CHUNK_BYTES // max(1, row_bytes))
        for start in range(0, len(self), step):
            yield slice(start, min(start + step, len(self)))

    def to_device(self, device: torch.device) -> torch.Tensor:
        """The whole model input on `device`, converted chunk by chunk."""
        data = torch.empty((len(self), *self.input_shape), dtype=torch.float32, device=device)
        for part in self.chunks():
            data[part] = self.model_input(np.arange(part.start, part.stop)).to(device)
        return data

    def sha256(self) -> str:
        """sha256 of the kept rows as stored, shape first: the digest of the C-contiguous array
        `source[rows]` (as the run key always hashed it), read chunk by chunk."""
        digest = hashlib.sha256(f"{(len(self), *self.source.shape[1:])}".encode())
        for part in self.chunks():
            digest.update(np.ascontiguousarray(self.source[self.rows[part]]).data)
        return digest.hexdigest()


def kept_rows(
    images: np.ndarray | None,
    latents: np.ndarray | None,
    latent: dict[str, Any] | None,
    rows: np.ndarray | None,
    *,
    resolution: int,
) -> KeptRows:
    """The kept `rows` (None: all) of `images` or of `latents` (with their `latent` record),
    checked, without reading them."""
    if (images is None) == (latents is None):
        raise ValueError("train needs exactly one of images and latents")
    if (latents is None) != (latent is None):
        raise ValueError(
            "latents need their latent record (autoencoder, scale_factor), and only they"
        )
    source = images if latents is None else latents
    if images is not None:
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
            raise DataError(
                f"train needs uint8 images (N,H,W,C) with N >= 1, got {images.dtype}{images.shape}"
            )
    else:
        n, _, h, w = latents.shape if latents.ndim == 4 else (0, 0, 0, 0)
        if not np.issubdtype(latents.dtype, np.floating) or n == 0 or h != w:
            raise DataError(
                f"train needs float latents (N,C,h,w) with N >= 1 and h = w, got "
                f"{latents.dtype}{latents.shape}"
            )
        missing = {"autoencoder", "scale_factor"} - latent.keys()
        if missing:
            raise ValueError(f"the latent record lacks {sorted(missing)}")
    rows = np.arange(len(source)) if rows is None else np.asarray(rows)
    if (
        rows.ndim != 1
        or len(rows) == 0
        or not np.issubdtype(rows.dtype, np.integer)
        or rows.min() < 0
        or rows.max() >= len(source)
    ):
        raise DataError(
            f"train needs the kept rows as >= 1 integer ids in [0, {len(source)}), got "
            f"{rows.dtype}{rows.shape}"
        )
    if latents is None:
        return KeptRows(images, rows.astype(np.int64), resolution=resolution)
    return KeptRows(latents, rows.astype(np.int64), scale=float(latent["scale_factor"]))


def free_bytes(device: torch.device) -> int:
    """Free memory of `device`: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def on_device(
    setting: bool | str, input_bytes: int, device: torch.device, *, copies: int = 1
) -> tuple[bool, int | None]:
    """Whether the model input goes on the device (`train.data_on_device`: true, false or auto),
    and the free bytes that auto weighed it against (None otherwise). `copies`: the processes
    that each hold one in this memory."""
    if setting != "auto":
        return bool(setting), None
    free = free_bytes(device)
    return input_bytes * copies <= DEVICE_SHARE * free, free


def step_inputs(
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
    # (seed, 0, step): the 0 was the process index when each process drew its own batch; kept,
    # so one-process runs draw as before
    generator = step_generator(seed, 0, step)
    rows = torch.randint(0, len(data), (batch_size,), generator=generator)
    # draw() reads only the batch's shape, device and dtype: a stand-in with no storage
    batch = torch.empty(()).expand(batch_size, *data.input_shape)
    noise, timesteps = draw(batch, scheduler, generator=generator)
    class_labels = None
    if dropout is not None:
        dropped = batch_labels(labels, rows, null=null, dropout=dropout, generator=generator)
        class_labels = dropped[mine]
    inputs = {"noise": noise[mine], "timesteps": timesteps[mine], "class_labels": class_labels}
    if host:
        inputs["x0"] = data.model_input(rows[mine].numpy())
    else:
        inputs["rows"] = rows[mine]
    return inputs


def batch_labels(
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


class StepPrefetch:
    """`make(step)` (CPU tensors, or None) for every step of `steps`, made one step ahead in a
    background thread and moved to `device`: pinned and non-blocking on CUDA.

    A context manager (its thread stops on leaving); iterating yields (step, inputs on device).
    """

    def __init__(self, make: Callable[[int], Inputs], steps: range, device: torch.device):
        self.make, self.steps, self.device = make, steps, device
        self._pin = device.type == "cuda"
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> StepPrefetch:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="train-inputs")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[tuple[int, Inputs]]:
        ahead: Future | None = None
        for i, step in enumerate(self.steps):
            current = ahead or self._pool.submit(self._host, step)
            ahead = self._pool.submit(self._host, self.steps[i + 1]) if i + 1 < len(self) else None
            inputs = current.result()
            yield step, {k: None if v is None else self._move(v) for k, v in inputs.items()}

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def _host(self, step: int) -> Inputs:
        inputs = self.make(step)
        if self._pin:
            inputs = {k: None if v is None else v.pin_memory() for k, v in inputs.items()}
        return inputs
