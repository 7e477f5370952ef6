"""Degenerate clusters: where a cluster rule's ranking by distance decides nothing.

The cluster rules (furthest, nearest, mid, balanced) keep samples by their distance to their
centroid, with ties broken by sample id. When a cluster's distances are all equal (identical or
duplicated images, an embedder that maps many images to one point), or most samples share their
distance with another one, "furthest" keeps samples in sample-id order: the selection is then
arbitrary, not the method. `degeneracy` measures this from clusters.parquet; the cluster rule
records it in clusters.json and logs it, and the report puts `warning_text` at its top.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# Above this share of samples whose distance ties another one's in their cluster, the ranking
# is mostly sample-id order (a few exact ties are normal for duplicated images).
TIED_SHARE_WARNING = 0.05


def degeneracy(clusters: pd.DataFrame, k: int) -> dict[str, Any]:
    """Per clustering: clusters with one distance only (no spread), singleton and empty clusters,
    the share of samples whose distance ties another's in their cluster, and a warning (None when
    the ranking by distance is meaningful)."""
    sizes = np.bincount(clusters["cluster"].to_numpy(), minlength=k)
    spread = clusters.groupby("cluster")["distance"].agg(lambda d: float(d.max() - d.min()))
    flat = [int(c) for c, s in spread.items() if s == 0.0 and sizes[c] > 1]
    tied = float(clusters.duplicated(["cluster", "distance"], keep=False).mean())
    record = {
        "clusters_without_spread": flat,
        "singleton_clusters": [int(c) for c in np.flatnonzero(sizes == 1)],
        "empty_clusters": [int(c) for c in np.flatnonzero(sizes == 0)],
        "tied_distance_share": round(tied, 6),
    }
    record["warning"] = warning_text(record)
    if record["warning"]:
        log.warning(record["warning"])
    return record


def warning_text(record: dict[str, Any]) -> str | None:
    """One sentence naming what is degenerate, or None."""
    problems = []
    if record["clusters_without_spread"]:
        problems.append(
            f"clusters {record['clusters_without_spread']} have one distance for every member "
            "(identical embeddings)"
        )
    if record["tied_distance_share"] > TIED_SHARE_WARNING:
        problems.append(
            f"{record['tied_distance_share']:.1%} of samples tie another's distance to their "
            "centroid"
        )
    if record["empty_clusters"]:
        problems.append(f"clusters {record['empty_clusters']} are empty")
    if not problems:
        return None
    return (
        "degenerate k-means clusters: "
        + "; ".join(problems)
        + ". The cluster rules then keep tied samples in sample-id order, not by distance: "
        "check the data for duplicates or lower cluster.k."
    )
