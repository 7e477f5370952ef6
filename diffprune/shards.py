"""Sharded stages: N jobs over contiguous row slices of the store, then one gather job.

A shard holds whole batches of the unsharded run (its first row is a multiple of the batch size),
so every batch is the very batch one job would compute, and the gathered `.npy` has the bytes of
the unsharded one. No torch here: the gather job only copies rows.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffprune.errors import ConfigError
from diffprune.io import atomic_path, open_memmap

COPY_ROWS = 65536  # rows copied at a time by the gather: memory O(chunk), not O(dataset)


def shard_rows(n_rows: int, shards: int, shard: int, batch_size: int, *, key: str) -> range:
    """The rows of shard `shard` of `shards`: a contiguous run of whole batches, the batches
    spread as evenly as they divide. Refuses more shards than batches (a shard with no rows)."""
    batches = -(-n_rows // batch_size)
    if shards > batches:
        raise ConfigError(
            f"{key} = {shards}: more shards than batches ({batches} of {batch_size} rows in "
            f"{n_rows}); allowed: 1..{batches}"
        )
    if not 0 <= shard < shards:
        raise ConfigError(f"shard {shard} of {key} = {shards}: allowed 0..{shards - 1}")
    first, last = shard * batches // shards, (shard + 1) * batches // shards
    return range(first * batch_size, min(last * batch_size, n_rows))


def gather_npy(parts: Sequence[str | os.PathLike], out_path: str | os.PathLike) -> tuple[int, ...]:
    """Concatenate the shards' `.npy` files along rows into `out_path` (the bytes np.save writes
    for the whole array), streamed through memory maps; the file appears only when complete."""
    arrays = [np.load(p, mmap_mode="r") for p in parts]
    tails = {(a.dtype.str, a.shape[1:]) for a in arrays}
    if len(tails) != 1:
        raise ValueError(f"shards {list(map(str, parts))} disagree on dtype/row shape: {tails}")
    shape = (sum(len(a) for a in arrays), *arrays[0].shape[1:])
    with atomic_path(out_path) as tmp:
        out = open_memmap(tmp, dtype=arrays[0].dtype, shape=shape)
        try:
            start = 0
            for a in arrays:
                for i in range(0, len(a), COPY_ROWS):
                    chunk = a[i : i + COPY_ROWS]
                    out[start + i : start + i + len(chunk)] = chunk
                start += len(a)
            out.flush()
        finally:
            del out  # closes the memory map before the rename
    return shape


def gather_meta(
    metas: Sequence[dict[str, Any]], *, summed: Sequence[str] = ("seconds",)
) -> dict[str, Any]:
    """The sidecar of the unsharded job from the shards': the same keys in the same order, the
    row count (`n`, or the first entry of `shape`) and the `summed` keys (compute time) added over
    the shards; shards must agree on everything else (same model, params, inputs), checked so a
    shard left from other settings is never gathered."""
    counts = ("rows", "n", "shape", *summed)
    rest = [{k: v for k, v in m.items() if k not in counts} for m in metas]
    if any(r != rest[0] for r in rest[1:]):
        raise ValueError("shard sidecars disagree beyond their rows: made with different settings")
    rows = [m["rows"] for m in metas]
    if rows[0][0] != 0 or any(a[1] != b[0] for a, b in itertools.pairwise(rows)):
        raise ValueError(f"shard rows {rows} are not contiguous from row 0")
    out = {k: v for k, v in metas[0].items() if k != "rows"}
    if "n" in out:
        out["n"] = sum(m["n"] for m in metas)
    if "shape" in out:
        out["shape"] = [sum(m["shape"][0] for m in metas), *out["shape"][1:]]
    return {**out, **{k: sum(m[k] for m in metas) for k in summed}}
