"""One embed job: the store's rows (all of them, or one shard's slice) into a `.npy` and the
sidecar the rest of the study reads (workflow/scripts/embed.py and embed_shard.py).

The job reuses freed memory (`diffprune.allocator`): 2.2x faster on 2 CPU cores (`make bench`),
bit-identical embeddings. Images are read and embeddings written batch by batch (memory O(batch)).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from diffprune import io
from diffprune.allocator import keep_freed_memory
from diffprune.batches import resolve_num_workers
from diffprune.embed import embed_to_file, embedder_info, load_embedder
from diffprune.logs import stopwatch

# Keys that say how the stage is split into jobs, not what it computes: left out of the
# provenance, so the sidecar of N shards is the sidecar of one job.
LAYOUT_KEYS = ("shards",)


def embed_rows(
    images: np.ndarray,
    cfg: dict[str, Any],
    out_path: str | os.PathLike,
    *,
    images_path: str | os.PathLike,
    rows: range | None = None,
) -> dict[str, Any]:
    """Embed `images[rows]` (all rows when None) into `out_path`; returns the sidecar: the
    embedder, row count, seconds, device, loader workers and provenance (+ `rows` for a shard)."""
    keep_freed_memory()
    part = images if rows is None else images[rows.start : rows.stop]
    with stopwatch() as timing:
        embedder = load_embedder(
            cfg["model"], weights=cfg["weights"], image_size=cfg["image_size"], device=cfg["device"]
        )
        num_workers = resolve_num_workers(
            cfg.get("num_workers", "auto"), embedder.device, key="embed.num_workers"
        )
        shape = embed_to_file(
            part, embedder, out_path, batch_size=cfg["batch_size"], num_workers=num_workers
        )
    params = {k: v for k, v in cfg.items() if k not in LAYOUT_KEYS}
    meta = {
        **embedder_info(embedder),
        "n": shape[0],
        "seconds": timing["seconds"],
        "device": str(embedder.device),
        "num_workers": num_workers,
        "provenance": io.provenance(params=params, inputs={"images": images_path}),
    }
    return meta if rows is None else {**meta, "rows": [rows.start, rows.stop]}
