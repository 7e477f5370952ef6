"""k-means clustering of embeddings: each sample's cluster and distance to its centroid.

Two paths, chosen by size (`backend="auto"`):

- float64 (n * k * d <= EXACT_MAX_WORK, the default study and CelebA-HQ sizes): seeding and
  Lloyd iterations in float64 numpy, on the CPU, with the same result on every CPU. faiss ranks
  centroids with float32 distances from a CPU-specific OpenBLAS sgemm kernel and SIMD norms
  (OPENBLAS_CORETYPE and FAISS_SIMD_LEVEL each changed one sample's cluster on 10,000 x 1280
  overlapping points), so two machines disagree on points near a cluster boundary, and one moved
  point moves the centroids and every later distance. Here every number that decides anything is
  a fixed-order sum of correctly rounded elementwise operations (`_sq_norms`), which SIMD width
  and BLAS kernels cannot change; BLAS only pre-ranks centroids, and a point whose two best
  centroids are closer than BLAS's worst-case rounding error is re-ranked exactly (`_assign`).
  Lloyd iterations stop when the assignment no longer changes.
- faiss (larger, ImageNet scale): faiss k-means on the GPU when `device` resolves to CUDA and
  faiss has GPU support, else on the CPU, in float32. Its centroids can differ across CPUs and
  GPUs; the final assignment and distances are the exact float64 ones for those centroids.

Both run Lloyd iterations on ALL points by default (faiss's default would silently subsample to
256 points per centroid) from a seeded k-means++ start (or afk-mc2, a cheaper approximation of it).
Beyond memory, `fit_size` fits the centroids on a seeded sample of that many points (held in
memory) and then assigns every point in chunks read from the (memory-mapped) embeddings, with the
same exact assignment as above: chunking cannot change a point's cluster or distance. faiss's
default start (k random points, init="random") ended in a local optimum that merges two blobs for
5 of 30 seeds on three well-separated Gaussian blobs; k-means++ for none.

Data with fewer distinct points than k (duplicates) can leave clusters empty; each is given one
point (see `_fill_empty`), so every cluster id 0..k-1 has at least one member.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd

from diffprune.errors import ConfigError, DataError
from diffprune.machine import describe

log = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 24  # temporaries hold ~16M float64 values (128 MB)
# Above this n * k * d the float64 path's seeding (k passes over the data) and Lloyd iterations
# get slow on a CPU, and faiss takes over.
EXACT_MAX_WORK = 2 * 10**9
AFKMC2_CHAIN = 50  # Markov chain length of afk-mc2 (faiss's default)
_EPS = np.finfo(np.float64).eps / 2  # unit roundoff of float64
INITS = {
    "k-means++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
    "afk-mc2": faiss.ClusteringInitMethod_AFK_MC2,  # cheaper approximation of k-means++
    "random": faiss.ClusteringInitMethod_RANDOM,
}
BACKENDS = ("auto", "float64", "faiss")


@dataclass(frozen=True)
class Clustering:
    """Result of `kmeans`. Distances are Euclidean (not squared) to the sample's own centroid."""

    centroids: np.ndarray  # (k, D) float32
    assignments: np.ndarray  # (N,) int64, in sample_id order
    distances: np.ndarray  # (N,) float32
    iterations: int  # Lloyd iterations run (float64: fewer once the assignment is stable)
    seconds: float
    backend: str  # float64 | faiss-cpu | faiss-gpu
    fit_points: int  # points the centroids were fitted on: N, or fit_size
    fit_seconds: float  # of `seconds`: drawing the sample and fitting; the rest is assignment


def validate_embeddings(embeddings: np.ndarray, *, rows: np.ndarray | None = None) -> np.ndarray:
    """Return the embeddings as a C-contiguous float32 (N, D) array, or raise DataError.

    `rows`: the file's row numbers of these rows, named in the error when they are a chunk or a
    sample of a file.
    """
    embeddings = np.asarray(embeddings)
    _check_shape(embeddings)
    with np.errstate(over="ignore"):  # values beyond float32 range become inf: reported below
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
    # A float64 row sum of float32 values cannot overflow, so it is non-finite iff the row is.
    bad = ~np.isfinite(x.sum(axis=1, dtype=np.float64))
    if bad.any():
        which = "rows" if rows is None else "rows read"
        first = int(np.argmax(bad)) if rows is None else int(rows[np.argmax(bad)])
        raise DataError(
            f"embeddings contain NaN or inf in {int(bad.sum())} of {len(bad)} {which} "
            f"(first: row {first})"
        )
    return x


def _check_shape(embeddings: np.ndarray) -> None:
    """A non-empty 2-D array of real numbers, checked without reading its values."""
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise DataError(
            f"embeddings must be a non-empty 2-D array (N, D), got shape {embeddings.shape}"
        )
    if not np.issubdtype(embeddings.dtype, np.number) or np.issubdtype(
        embeddings.dtype, np.complexfloating
    ):
        raise DataError(f"embeddings must be real numbers, got dtype {embeddings.dtype}")


def validate_k(k: int, n: int, *, key: str = "k") -> int:
    """k must be an integer in [1, n]: k-means cannot make more non-empty clusters than samples.

    `key` names where k came from (a param, a flag) in the error.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ConfigError(f"k must be an integer number of clusters, got {k!r}")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if k > n:
        raise ConfigError(
            f"{key} = {k} is larger than the number of samples ({n}); allowed: 1..{n}"
        )
    return int(k)


def validate_fit_size(fit_size: int | None, k: int, n: int, *, key: str = "fit_size") -> int | None:
    """fit_size must be null (fit on all points) or an integer in [k, n]: the sample must hold at
    least one point per centroid and cannot exceed the data."""
    if fit_size is None:
        return None
    if (
        isinstance(fit_size, bool)
        or not isinstance(fit_size, int | np.integer)
        or not (k <= fit_size <= n)
    ):
        raise ConfigError(
            f"{key} = {fit_size!r}: must be null (all {n} points) or an integer in "
            f"[k, N] = [{k}, {n}]"
        )
    return int(fit_size)


def kmeans(
    embeddings: np.ndarray,
    *,
    k: int,
    iterations: int = 50,
    seed: int = 0,
    device: str = "auto",
    init: str = "k-means++",
    backend: str = "auto",
    key: str = "k",
    fit_size: int | None = None,
    fit_key: str = "fit_size",
    chunk_rows: int | None = None,
) -> Clustering:
    """Cluster (N, D) embeddings into k clusters (see the module docstring for the two paths).

    `key` and `fit_key` name k's and fit_size's sources in their errors (e.g. cluster.k).
    fit_size None fits on all points, in memory; an integer fits on a seeded sample of that many
    points, then assigns all points `chunk_rows` at a time (default: about 128 MB of float64
    temporaries), so `embeddings` can be a memory map larger than memory.

    Seeded. The float64 path gives the same bytes on any CPU; the faiss path (GPU when `device`
    resolves to CUDA and faiss has GPU support, the `gpu` extra) the same on the same hardware.
    """
    x = np.asarray(embeddings)  # a memory map's view: nothing is read yet
    _check_shape(x)
    if fit_size is None:
        x = validate_embeddings(x)  # else validated chunk by chunk as it is read
    n = len(x)
    k = validate_k(k, n, key=key)
    fit_size = validate_fit_size(fit_size, k, n, key=fit_key)
    _check_options(iterations, seed, init, backend)
    gpu = _use_gpu(device)  # validates `device` on both paths; float64 always runs on the CPU

    start = time.perf_counter()
    if fit_size is None:
        centroids, assignments, done, backend = _fit(x, k, iterations, seed, init, backend, gpu)
        fitted = time.perf_counter()
        if assignments is None:
            assignments = _assign_filled(x, centroids)
        squared = _own_sq(x, centroids, assignments)
    else:
        sample = fit_sample(x, fit_size, seed)
        centroids, _, done, backend = _fit(sample, k, iterations, seed, init, backend, gpu)
        del sample
        fitted = time.perf_counter()
        assignments, squared = assign_chunked(x, centroids, chunk_rows=chunk_rows)
    seconds = time.perf_counter() - start
    log.info(
        "k-means (%s): %d points (fitted on %d), k=%d, %d iterations in %.1f s",
        *(backend, n, fit_size or n, k, done, seconds),
    )
    return Clustering(
        centroids.astype(np.float32),
        assignments,
        np.sqrt(squared).astype(np.float32),
        done,
        seconds,
        backend,
        fit_size or n,
        fitted - start,
    )


def fit_sample(embeddings: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` rows drawn without replacement with `seed`, in row order (a sequential read of a
    memory map), validated as float32; all rows, unchanged, when size is N."""
    rows = np.sort(np.random.default_rng(seed).choice(len(embeddings), size=size, replace=False))
    return validate_embeddings(embeddings[rows], rows=rows)


def assign_chunked(
    embeddings: np.ndarray, centroids: np.ndarray, *, chunk_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every row's nearest centroid and exact squared distance to it, `chunk_rows` rows at a time.

    The same bytes as `_assign_filled` then `_own_sq` on all rows in memory: each row's result
    depends on that row and the centroids only (`_assign` is exact), and an empty cluster takes
    the same point (`_fill_empty`, which may move `centroids` in place). Memory beyond the (N,)
    results: one chunk and its temporaries.
    """
    n, dim = embeddings.shape
    step = chunk_rows or max(1, _CHUNK_ELEMENTS // max(len(centroids), dim))
    assignments = np.empty(n, dtype=np.int64)
    squared = np.empty(n)
    for lo in range(0, n, step):
        rows = validate_embeddings(
            embeddings[lo : lo + step], rows=np.arange(lo, min(lo + step, n))
        )
        assignments[lo : lo + step] = _assign(rows, centroids)
        squared[lo : lo + step] = _own_sq(rows, centroids, assignments[lo : lo + step])
    if np.bincount(assignments, minlength=len(centroids)).min() == 0:
        _fill_empty(embeddings, centroids, assignments, squared)
    return assignments, squared


def machine() -> dict[str, object]:
    """What a result that is not bitwise reproducible may depend on: CPU, SIMD, libraries."""
    return {
        **describe(),
        "faiss": faiss.__version__,
        # older faiss builds (some GPU wheels) have no SIMDConfig
        "faiss_simd": faiss.SIMDConfig.get_level_name() if hasattr(faiss, "SIMDConfig") else None,
        "faiss_gpus": faiss.get_num_gpus(),
    }


def clusters_frame(clustering: Clustering) -> pd.DataFrame:
    """The clusters.parquet table: sample_id (int64), cluster (int64), distance (float32)."""
    return pd.DataFrame(
        {
            "sample_id": np.arange(len(clustering.assignments), dtype=np.int64),
            "cluster": clustering.assignments.astype(np.int64),
            "distance": clustering.distances.astype(np.float32),
        }
    )


def _check_options(iterations: int, seed: int, init: str, backend: str) -> None:
    if iterations < 1:
        raise ConfigError(f"k-means iterations must be at least 1, got {iterations}")
    if not 0 <= seed < 2**31:
        raise ConfigError(f"k-means seed must be in [0, 2**31), got {seed}")
    if init not in INITS:
        raise ConfigError(f"unknown k-means init {init!r}; allowed: {', '.join(INITS)}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown k-means backend {backend!r}; allowed: {', '.join(BACKENDS)}")


def _fit(
    x: np.ndarray, k: int, iterations: int, seed: int, init: str, backend: str, gpu: bool
) -> tuple[np.ndarray, np.ndarray | None, int, str]:
    """Centroids (float64) fitted on x, x's assignments (float64 path only: faiss's are not the
    exact ones), Lloyd rounds run, and the backend that ran (`auto` chosen by n * k * d)."""
    if backend == "auto":
        backend = "float64" if x.size * k <= EXACT_MAX_WORK else "faiss"
    if backend == "float64":
        centroids, assignments, done = _lloyd64(x, k, iterations, seed, init)
        return centroids, assignments, done, backend
    centroids = _faiss_centroids(x, k, iterations, seed, init, gpu).astype(np.float64)
    return centroids, None, iterations, "faiss-gpu" if gpu else "faiss-cpu"


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


def _faiss_centroids(
    x: np.ndarray, k: int, iterations: int, seed: int, init: str, gpu: bool
) -> np.ndarray:
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        seed=seed,
        init_method=INITS[init],
        gpu=gpu,
        # faiss subsamples when N > k * max_points_per_centroid; ceil(N/k) keeps every point.
        max_points_per_centroid=-(-len(x) // k),
        min_points_per_centroid=1,
    )
    km.train(x)
    return np.array(km.centroids, dtype=np.float32)


def _lloyd64(
    x: np.ndarray, k: int, iterations: int, seed: int, init: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Seeding and Lloyd iterations in float64: centroids, assignments, rounds run.

    Each round moves the centroids to their clusters' means and reassigns; it stops early when
    the assignment did not change (the centroids would not either).
    """
    rng = np.random.default_rng(seed)
    if init == "random":
        centroids = x[rng.choice(len(x), size=k, replace=False)].astype(np.float64)
    elif init == "k-means++":
        centroids = _kmeans_pp(x, k, rng)
    else:
        centroids = _afkmc2(x, k, rng)
    assignments = _assign_filled(x, centroids)
    done = 0
    while done < iterations:
        done += 1
        centroids = _means(x, assignments, k)
        previous = assignments
        assignments = _assign_filled(x, centroids)
        if np.array_equal(assignments, previous):
            break
    return centroids, assignments, done


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ (Arthur & Vassilvitskii 2007): each next centroid is drawn with probability
    proportional to its squared distance to the nearest centroid so far."""
    chosen = [int(rng.integers(len(x)))]
    nearest = _sq_to(x, x[chosen[0]])
    for _ in range(1, k):
        chosen.append(_draw(np.cumsum(nearest), rng))
        np.minimum(nearest, _sq_to(x, x[chosen[-1]]), out=nearest)
    return x[chosen].astype(np.float64)


def _afkmc2(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """afk-mc2 (Bachem et al. 2016): k-means++ approximated by Metropolis-Hastings chains of
    AFKMC2_CHAIN points drawn from a proposal fixed after the first centroid, so each further
    centroid costs AFKMC2_CHAIN distance evaluations instead of a pass over the data."""
    first = int(rng.integers(len(x)))
    to_first = _sq_to(x, x[first])
    total = to_first.sum()
    proposal = (0.5 * to_first / total if total > 0 else 0.0) + 0.5 / len(x)
    cumulative = np.cumsum(proposal)
    centroids = [x[first].astype(np.float64)]
    for _ in range(1, k):
        candidates = np.array([_draw(cumulative, rng) for _ in range(AFKMC2_CHAIN + 1)])
        nearest = _exact_sq(x[candidates], np.array(centroids)).min(axis=1)
        accept = rng.random(AFKMC2_CHAIN)
        current = 0
        for step in range(1, AFKMC2_CHAIN + 1):
            # Metropolis-Hastings: move with probability min(1, d(y) q(x) / (d(x) q(y)))
            moved = nearest[step] * proposal[candidates[current]]
            stay = nearest[current] * proposal[candidates[step]]
            if stay == 0 or accept[step - 1] * stay < moved:
                current = step
        centroids.append(x[candidates[current]].astype(np.float64))
    return np.array(centroids)


def _draw(cumulative: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability proportional to its weight (uniform if all are 0)."""
    total = cumulative[-1]
    if total <= 0:
        return int(rng.integers(len(cumulative)))
    return min(
        int(np.searchsorted(cumulative, rng.random() * total, side="right")), len(cumulative) - 1
    )


def _sq_norms(a: np.ndarray) -> np.ndarray:
    """Squared row norms as a fixed-order (pairwise) float64 sum of correctly rounded squares.

    Elementwise operations round the same on every CPU and numpy's pairwise summation has a fixed
    order, unlike BLAS, einsum and matmul, whose kernels sum in CPU-specific orders.
    """
    a = a.astype(np.float64, copy=False)
    return np.add.reduce(a * a, axis=-1)


def _sq_to(x: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Exact (fixed-order) squared distance of every row of x to one point."""
    out = np.empty(len(x))
    step = max(1, _CHUNK_ELEMENTS // x.shape[1])
    for lo in range(0, len(x), step):
        out[lo : lo + step] = _sq_norms(x[lo : lo + step].astype(np.float64) - point)
    return out


def _exact_sq(rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Exact (fixed-order) squared distances, (len(rows), len(centroids)), in row chunks."""
    out = np.empty((len(rows), len(centroids)))
    step = max(1, _CHUNK_ELEMENTS // centroids.size)
    for lo in range(0, len(rows), step):
        chunk = rows[lo : lo + step].astype(np.float64)
        out[lo : lo + step] = _sq_norms(chunk[:, None, :] - centroids[None, :, :])
    return out


def _assign_filled(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """`_assign`, then `_fill_empty` if a cluster is empty (which may move centroids in place)."""
    assignments = _assign(x, centroids)
    if np.bincount(assignments, minlength=len(centroids)).min() == 0:
        _fill_empty(x, centroids, assignments, _own_sq(x, centroids, assignments))
    return assignments


def _assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each row's nearest centroid by exact squared distance (ties: lowest id).

    BLAS ranks the centroids fast (|x|^2 - 2 x.c + |c|^2, float64). Any summation order is within
    (D + 3) eps (|x| + |c|)^2 of the true value, and so is the exact sum, so a row whose two best
    BLAS distances are further apart than twice both errors (margin below, with a factor 2 to
    spare) has the same unique nearest centroid under the exact sum; the other rows are re-ranked
    exactly. The result is therefore the same whatever BLAS kernel, thread count or CPU ran.
    """
    n, dim = x.shape
    assignments = np.empty(n, dtype=np.int64)
    centroid_sq = _sq_norms(centroids)
    largest = float(np.sqrt(centroid_sq.max()))
    step = max(1, _CHUNK_ELEMENTS // max(len(centroids), dim))
    for lo in range(0, n, step):
        rows = x[lo : lo + step].astype(np.float64)
        row_sq = _sq_norms(rows)
        approx = row_sq[:, None] - 2.0 * (rows @ centroids.T) + centroid_sq[None, :]
        best = approx.argmin(axis=1)
        if len(centroids) > 1:
            two = np.partition(approx, 1, axis=1)
            margin = 8 * (dim + 3) * _EPS * (np.sqrt(row_sq) + largest) ** 2
            unsure = np.flatnonzero(two[:, 1] - two[:, 0] <= margin)
            if len(unsure):
                best[unsure] = _exact_sq(rows[unsure], centroids).argmin(axis=1)
        assignments[lo : lo + step] = best
    return assignments


def _own_sq(x: np.ndarray, centroids: np.ndarray, assignments: np.ndarray) -> np.ndarray:
    """Exact squared distance of each row to its own centroid."""
    out = np.empty(len(x))
    step = max(1, _CHUNK_ELEMENTS // x.shape[1])
    for lo in range(0, len(x), step):
        rows = x[lo : lo + step].astype(np.float64)
        out[lo : lo + step] = _sq_norms(rows - centroids[assignments[lo : lo + step]])
    return out


def _means(x: np.ndarray, assignments: np.ndarray, k: int) -> np.ndarray:
    """Cluster means in float64, each summed over its members in sample_id order."""
    counts = np.bincount(assignments, minlength=k)
    members = x[np.argsort(assignments, kind="stable")]
    ends = np.cumsum(counts)
    return np.stack(
        [
            members[end - count : end].astype(np.float64).sum(axis=0) / count
            for count, end in zip(counts, ends, strict=True)
        ]
    )


def _fill_empty(
    x: np.ndarray, centroids: np.ndarray, assignments: np.ndarray, squared: np.ndarray
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
        donor = candidates[np.argmax(squared[candidates])]
        counts[assignments[donor]] -= 1
        counts[cluster] = 1
        assignments[donor] = cluster
        centroids[cluster] = np.asarray(x[donor], dtype=np.float32)  # x may be a raw memmap
        squared[donor] = 0.0
    if len(empty):
        log.debug(
            "k-means: %d of %d clusters empty; each took one point", len(empty), len(centroids)
        )
