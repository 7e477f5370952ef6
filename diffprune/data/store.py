"""The image store on disk: `images.npy` (uint8 N,H,W,C), `index.parquet` and `store.json`.

Row i of the index (`sample_id` i, `label`, `source`) describes image i. Every later stage reads
images through `load_store`, memory-mapped, so no stage holds a whole dataset in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from diffprune.errors import DataError
from diffprune.io import atomic_path, load_json, open_memmap, save_json, save_parquet

log = logging.getLogger(__name__)

STORE_FILES = ("images.npy", "index.parquet", "store.json")


@dataclass
class Store:
    """One split on disk; `images` is memory-mapped (read-only), `index` row i is sample_id i."""

    images: np.ndarray
    index: pd.DataFrame
    meta: dict

    def __len__(self) -> int:
        return len(self.index)


def write_store(
    out_dir,
    batches: Iterable[np.ndarray],
    shape: tuple[int, ...],
    index: pd.DataFrame,
    meta: dict,
) -> None:
    """Write the three files of a store, each to a temporary name renamed when complete.

    The images arrive in batches and go straight to a memory-mapped images.npy (the same bytes
    as np.save of the whole array), so writing never holds more than one batch.
    """
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "images.npy") as tmp:
        images = open_memmap(tmp, dtype=np.uint8, shape=shape)  # disk allocated first
        written = 0
        for batch in batches:
            images[written : written + len(batch)] = batch
            written += len(batch)
        if written != shape[0]:
            raise DataError(f"image store {out_dir}: got {written} images, expected {shape[0]}")
        images.flush()
        del images
    save_parquet(out_dir / "index.parquet", index)
    save_json(out_dir / "store.json", meta)
    log.info("wrote store %s: %s", out_dir, shape)


def load_store(dir) -> Store:
    """Open a store written by build_store; images are memory-mapped read-only."""
    dir = Path(dir)
    paths = [dir / name for name in STORE_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"image store {dir} is incomplete: missing {missing}; run build_store")
    images = np.load(paths[0], mmap_mode="r")
    index = pd.read_parquet(paths[1])
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(index):
        raise DataError(
            f"image store {dir}: images {images.dtype}{images.shape} do not match "
            f"{len(index)} index rows (expected uint8 N,H,W,C)"
        )
    return Store(images=images, index=index, meta=load_json(paths[2]))
