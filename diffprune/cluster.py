"""k-means clustering of embeddings with faiss: each sample's cluster and distance to its centroid.

faiss runs Lloyd iterations on ALL points (its default would silently subsample to 256 points per
centroid) from a seeded k-means++ initialisation. faiss' default initialisation (k random points,
init="random") ended in a local optimum that merges two blobs for 5 of 30 seeds on three
well-separated Gaussian blobs; k-means++ for none.

During training faiss refills an empty cluster by splitting a large one, but data with fewer
distinct points than k (duplicates) can still end with empty clusters; those are filled explicitly
after training (see `_fill_empty`), so every cluster id 0..k-1 has at least one member.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd

from diffprune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_ROWS_PER_CHUNK_ELEMENTS = 1 << 24  # distances are computed in chunks of ~16M float64 values
INITS = {
    "k-means++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
    "afk-mc2": faiss.ClusteringInitMethod_AFK_MC2,  # cheaper approximation of k-means++
    "random": faiss.ClusteringInitMethod_RANDOM,
}


@dataclass(frozen=True)
class Clustering:
    """Result of `kmeans`. Distances are Euclidean (not squared) to the sample's own centroid."""

    centroids: np.ndarray  # (k, D) float32
    assignments: np.ndarray  # (N,) int64, in sample_id order
    distances: np.ndarray  # (N,) float32
    iterations: int
    seconds: float


def validate_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """Return the embeddings as a C-contiguous float32 (N, D) array, or raise DataError."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise DataError(
            f"embeddings must be a non-empty 2-D array (N, D), got shape {embeddings.shape}"
        )
    if not np.issubdtype(embeddings.dtype, np.number) or np.issubdtype(
        embeddings.dtype, np.complexfloating
    ):
        raise DataError(f"embeddings must be real numbers, got dtype {embeddings.dtype}")
    with np.errstate(over="ignore"):  # values beyond float32 range become inf: reported below
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
    # A float64 row sum of float32 values cannot overflow, so it is non-finite iff the row is.
    bad = ~np.isfinite(x.sum(axis=1, dtype=np.float64))
    if bad.any():
        raise DataError(
            f"embeddings contain NaN or inf in {int(bad.sum())} of {len(bad)} rows "
            f"(first: row {int(np.argmax(bad))})"
        )
    return x


def validate_k(k: int, n: int) -> int:
    """k must be an integer in [1, n]: k-means cannot make more non-empty clusters than samples."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ConfigError(f"k must be an integer number of clusters, got {k!r}")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if k > n:
        raise ConfigError(f"k={k} is larger than the number of samples ({n}); use k <= {n}")
    return int(k)


def kmeans(
    embeddings: np.ndarray,
    *,
    k: int,
    iterations: int = 50,
    seed: int = 0,
    device: str = "auto",
    init: str = "k-means++",
) -> Clustering:
    """Cluster (N, D) embeddings into k clusters with faiss k-means.

    Seeded (same inputs, seed and hardware => same result); runs on the GPU when `device` resolves
    to CUDA and the installed faiss has GPU support (the `gpu` extra), else on the CPU.
    """
    x = validate_embeddings(embeddings)
    n, dim = x.shape
    k = validate_k(k, n)
    if iterations < 1:
        raise ConfigError(f"k-means iterations must be at least 1, got {iterations}")
    if not 0 <= seed < 2**31:
        raise ConfigError(f"k-means seed must be in [0, 2**31), got {seed}")
    if init not in INITS:
        raise ConfigError(f"unknown k-means init {init!r}; allowed: {', '.join(INITS)}")

    gpu = _use_gpu(device)
    start = time.perf_counter()
    km = faiss.Kmeans(
        dim,
        k,
        niter=iterations,
        seed=seed,
        init_method=INITS[init],
        gpu=gpu,
        # faiss subsamples when N > k * max_points_per_centroid; ceil(N/k) keeps every point.
        max_points_per_centroid=-(-n // k),
        min_points_per_centroid=1,
    )
    km.train(x)
    centroids = np.array(km.centroids, dtype=np.float32)
    _, nearest = km.index.search(x, 1)
    assignments = nearest[:, 0].astype(np.int64)
    distances = _distances(x, centroids, assignments)
    _fill_empty(x, centroids, assignments, distances)
    seconds = time.perf_counter() - start
    log.info("k-means: %d points, k=%d, %d iterations in %.1f s", n, k, iterations, seconds)
    return Clustering(centroids, assignments, distances, iterations, seconds)


def clusters_frame(clustering: Clustering) -> pd.DataFrame:
    """The clusters.parquet table: sample_id (int64), cluster (int64), distance (float32)."""
    return pd.DataFrame(
        {
            "sample_id": np.arange(len(clustering.assignments), dtype=np.int64),
            "cluster": clustering.assignments.astype(np.int64),
            "distance": clustering.distances.astype(np.float32),
        }
    )


def _use_gpu(device: str) -> bool:
    from diffprune.device import resolve_device  # imports torch: only when clustering

    try:
        resolved = resolve_device(device)
    except RuntimeError as err:
        raise ConfigError(f"bad device {device!r}: {err}") from err
    if resolved.type != "cuda":
        return False
    if faiss.get_num_gpus() == 0:
        log.info("faiss has no GPU support (faiss-cpu installed): k-means runs on the CPU")
        return False
    return True


def _distances(x: np.ndarray, centroids: np.ndarray, assignments: np.ndarray) -> np.ndarray:
    """Euclidean distance of each row to its own centroid (float64 chunks, float32 result)."""
    out = np.empty(len(x), dtype=np.float32)
    step = max(1, _ROWS_PER_CHUNK_ELEMENTS // x.shape[1])
    for lo in range(0, len(x), step):
        diff = x[lo : lo + step].astype(np.float64) - centroids[assignments[lo : lo + step]]
        out[lo : lo + step] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def _fill_empty(
    x: np.ndarray, centroids: np.ndarray, assignments: np.ndarray, distances: np.ndarray
) -> None:
    """Give every empty cluster one point, in place.

    The point furthest from its own centroid (ties: lowest sample_id) among clusters with at
    least two members moves to the empty cluster and becomes its centroid (distance 0). Only
    happens on degenerate data, e.g. fewer distinct points than k.
    """
    counts = np.bincount(assignments, minlength=len(centroids))
    empty = np.flatnonzero(counts == 0)
    for cluster in empty:
        candidates = np.flatnonzero(counts[assignments] > 1)
        donor = candidates[np.argmax(distances[candidates])]
        counts[assignments[donor]] -= 1
        counts[cluster] = 1
        assignments[donor] = cluster
        centroids[cluster] = x[donor]
        distances[donor] = 0.0
    if len(empty):
        log.warning(
            "k-means left %d of %d clusters empty (duplicate points?); each took one point",
            len(empty),
            len(centroids),
        )
