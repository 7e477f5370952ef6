"""An array's rows in order, in contiguous batches, read through a torch DataLoader.

Embedding, encoding and scoring make one sequential pass over the image store. `row_batches`
reads it `batch_size` rows at a time (memory O(batch), never O(dataset)), optionally in worker
processes that also run the batch's CPU transform (resize, scaling) while the model works, and
into pinned memory for a fast copy to the GPU. Batch i is always rows [i * batch_size, ...), in
order, whatever the number of workers, so the results do not depend on it.

A memory map pickles as its full data, so the dataset never hands one to a worker: it keeps the
file, byte offset, shape and dtype, and each worker maps the file itself on first use (fork and
spawn alike). An in-memory array is inherited under fork (Linux's default) and would be pickled
whole under spawn.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffprune.errors import ConfigError

MAX_AUTO_WORKERS = 8


def resolve_num_workers(value: int | str, device: torch.device, *, key: str) -> int:
    """`auto` | int >= 0 -> the number of loader workers; `key` names the param in errors.

    auto is 0 on the CPU (the store is already decoded: workers would only take cores from the
    model) and min(8, CPU cores) on CUDA, where the model does not need the cores.
    """
    if value == "auto":
        return min(MAX_AUTO_WORKERS, os.cpu_count() or 1) if device.type == "cuda" else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key} = {value!r}: allowed: auto or an integer >= 0")
    return value


def row_batches(
    array: np.ndarray,
    batch_size: int,
    *,
    transform: Callable[[np.ndarray], torch.Tensor] | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (rows, transform(array[rows])) for consecutive batches of `array`, in order.

    `transform` runs where the batch is read (in the workers when num_workers > 0) and must be
    picklable for spawn (a module-level function or a functools.partial of one); default: the
    rows copied into a tensor. `pin_memory`: for a consumer on CUDA.
    `multiprocessing_context`: the workers' start method (None: the platform's default).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    dataset = _Batches(array, batch_size, transform or _as_tensor)
    workers = min(num_workers, len(dataset))  # no worker without a batch to read
    loader = DataLoader(
        dataset,
        batch_size=None,  # item i is already batch i
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        multiprocessing_context=multiprocessing_context if workers else None,
    )
    for i, batch in enumerate(loader):
        start = i * batch_size
        yield slice(start, start + len(batch)), batch


def _as_tensor(rows: np.ndarray) -> torch.Tensor:
    # a copy: the rows of a read-only memory map, which torch.from_numpy warns about
    return torch.from_numpy(np.array(rows))


class _Batches(Dataset):
    """Map-style dataset whose item i is transform(array[i * batch_size : (i + 1) * batch_size])."""

    def __init__(
        self, array: np.ndarray, batch_size: int, transform: Callable[[np.ndarray], Any]
    ) -> None:
        self.length, self.batch_size, self.transform = len(array), batch_size, transform
        self.file = _mapped_file(array)  # (path, offset, shape, dtype) or None
        self.array: np.ndarray | None = array

    def __len__(self) -> int:
        return -(-self.length // self.batch_size)

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        if self.array is None:  # a worker's first batch: map the file here
            path, offset, shape, dtype = self.file
            self.array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        start = i * self.batch_size
        return self.transform(self.array[start : start + self.batch_size])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.file is not None:
            state["array"] = None  # never pickle a memory map: that copies all of its data
        return state


def _mapped_file(array: np.ndarray) -> tuple[str, int, tuple[int, ...], np.dtype] | None:
    """(file, byte offset, shape, dtype) of a memory map (or a view of one); None for others.

    A view's own `offset` attribute is the original map's, so the offset is measured from the
    memmap that owns the mapping (the one whose base is the mmap object)."""
    if not isinstance(array, np.memmap) or array.filename is None:
        return None
    owner = array
    while not isinstance(owner.base, mmap.mmap):
        owner = owner.base
        if not isinstance(owner, np.memmap):
            return None  # not backed by a numpy mapping after all: treat as in memory
    if not array.flags.c_contiguous:
        raise ValueError(
            f"a strided view {array.shape} of the memory map {array.filename} cannot be read "
            "in batches by workers; pass a row slice of it (or np.asarray it)"
        )
    address = array.__array_interface__["data"][0]
    offset = owner.offset + address - owner.__array_interface__["data"][0]
    return str(array.filename), offset, tuple(array.shape), array.dtype
