"""Selection rules: which training samples to keep, as a prune manifest.

Conventions (the paper's, made exact here):

- `ratio` p is the fraction of samples REMOVED, 0 <= p < 1; 1-p is kept.
- Kept counts are floors: every cluster rule keeps floor(n_c*(1-p)) of the n_c members of each
  cluster c (cluster proportions are kept); random and score rules keep floor(N*(1-p)) of all N
  samples. 1-p is computed exactly from the ratio as written in decimal, so 10 samples at
  p=0.9 keep 1 (float arithmetic gives 0.9999... and would keep 0). A selection that keeps
  no sample at all is a ConfigError that says which ratio (or k) would keep some.
- Ties are broken by sample_id (lower sample_id first in the ranking) for cluster rules and by a
  seeded random order for score rules (forgetting scores tie a lot), so the result is a pure
  function of the inputs and `seed`.

Rules (what each KEEPS):

- random: a uniformly random floor(N(1-p)) samples (seeded).
- cluster-furthest: per cluster, the floor(n_c(1-p)) samples furthest from the centroid
  (the reference code's default).
- cluster-nearest: per cluster, the floor(n_c(1-p)) samples nearest to the centroid.
- cluster-mid: per cluster, the middle band of the distance ranking: of the r = n_c - keep
  removed samples, floor(r/2) are the nearest and the other r - floor(r/2) the furthest.
- cluster-random: per cluster, a random floor(n_c(1-p)) (seeded).
- cluster-balanced: the same number m from every non-empty cluster, the furthest from the
  centroid (balanced_order="furthest") or the nearest; m = min(smallest cluster size,
  floor(floor(N(1-p)) / k)) with k the number of non-empty clusters. At p=0 this is the paper's
  rule (m = smallest cluster size); the kept fraction is k*m/N, not 1-p.
- <score> for score in el2n, grand, forgetting, moso: the floor(N(1-p)) samples with the HIGHEST
  score (over all samples, not per cluster); <score>-inverse the lowest; <score>-mid the middle
  band of the score ranking (floor(r/2) lowest and the rest highest removed, as cluster-mid).
  Selection is by score value: sample order plays no part except to break ties.
- semdedup (SemDeDup, Abbas et al. 2023, as its reference code does it): within each cluster,
  members are ordered least prototypical first (ascending cosine similarity to the cluster's
  centroid, the mean of its members' embeddings; ties by sample_id), and a member is removed when
  its cosine similarity to any EARLIER member exceeds 1 - eps. So of each group of
  near-duplicates the least prototypical one is kept. The similarity (the manifest's `score`,
  NaN for a cluster's first member) does not depend on eps, so eps = select.semdedup_eps, or,
  when that is null, the threshold is the (r+1)-th largest similarity with r = N - floor(N(1-p)):
  exactly r removed when similarities do not tie there, fewer when they do.

The manifest has one row per sample, sorted by sample_id, with columns sample_id (int64), keep
(bool, True = kept for training), score (float64, NaN without scores), cluster (int64, -1 without
clusters) and distance (float64, Euclidean distance to the own centroid, NaN without clusters).
Evidence columns are filled from whatever inputs are passed, used by the method or not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd

from diffprune.errors import ConfigError, DataError
from diffprune.names import (
    BALANCED_ORDERS,
    CLUSTER_METHODS,
    FULL,
    SEMDEDUP,
    Run,
    needs,
    score_of,
    validate_method,
)

log = logging.getLogger(__name__)

# What each rule keeps, for the CLI help and the sidecar; "<score>" stands for any names.SCORES.
KEEPS = {
    "random": "a uniformly random floor(N(1-p)) of all samples (seeded)",
    "cluster-furthest": "per cluster, the floor(n_c(1-p)) furthest from the centroid",
    "cluster-nearest": "per cluster, the floor(n_c(1-p)) nearest to the centroid",
    "cluster-mid": "per cluster, the middle of the distance ranking: of the r = n_c - kept "
    "removed, floor(r/2) are the nearest and the rest the furthest",
    "cluster-random": "per cluster, a random floor(n_c(1-p)) (seeded)",
    "cluster-balanced": "the same number m from every cluster, the furthest (or nearest, "
    "--balanced-order) from the centroid; m = min(smallest cluster, floor(floor(N(1-p))/k)); "
    "the kept fraction is k*m/N",
    "<score>": "the floor(N(1-p)) samples with the HIGHEST score",
    "<score>-inverse": "the floor(N(1-p)) samples with the LOWEST score",
    "<score>-mid": "the middle of the score ranking: of the r removed, floor(r/2) lowest and "
    "the rest highest",
    "semdedup": "per cluster, one of each group of near-duplicates (cosine similarity > 1 - eps "
    "to an earlier member), the least prototypical (lowest similarity to the centroid); eps "
    "from select.semdedup_eps or set so that about N - floor(N(1-p)) are removed",
}

MANIFEST_COLUMNS = ("sample_id", "keep", "score", "cluster", "distance")


def validate_ratio(ratio: float) -> float:
    """The ratio is the fraction REMOVED and must lie in [0, 1)."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"ratio must be a number in [0, 1), got {ratio!r}") from None
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ConfigError(
            f"ratio must be in [0, 1) (the fraction of samples REMOVED), got {ratio!r}"
        )
    return value


def validate_scores(scores: np.ndarray, n: int | None = None) -> np.ndarray:
    """Scores: a finite 1-D array with one value per sample, in sample_id order."""
    scores = np.asarray(scores)
    if scores.ndim != 1 or (n is not None and len(scores) != n):
        want = f"length N={n}" if n is not None else "length N"
        raise DataError(
            f"scores must be a 1-D array of {want} (one per sample_id), got shape {scores.shape}"
        )
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(
        scores.dtype, np.complexfloating
    ):
        raise DataError(f"scores must be real numbers, got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    bad = ~np.isfinite(scores)
    if bad.any():
        raise DataError(
            f"scores contain {int(bad.sum())} NaN or inf values (first: sample {np.argmax(bad)})"
        )
    return scores


def validate_clusters(clusters: pd.DataFrame, n: int | None = None) -> pd.DataFrame:
    """Check a clusters table (sample_id, cluster, distance) and return it sorted by sample_id."""
    missing = [c for c in ("sample_id", "cluster", "distance") if c not in clusters.columns]
    if missing:
        raise DataError(f"clusters table lacks columns {missing}; it has {list(clusters.columns)}")
    if n is not None and len(clusters) != n:
        raise DataError(f"clusters table has {len(clusters)} rows but there are {n} samples")
    if len(clusters) == 0:
        raise DataError("clusters table is empty")
    for column in ("sample_id", "cluster"):
        if not pd.api.types.is_integer_dtype(clusters[column]):
            raise DataError(
                f"clusters column {column!r} must be integer, got {clusters[column].dtype}"
            )
    if not pd.api.types.is_numeric_dtype(clusters["distance"]):
        raise DataError(
            f"clusters column 'distance' must be numeric, got {clusters['distance'].dtype}"
        )
    frame = clusters.sort_values("sample_id", kind="stable", ignore_index=True)
    if frame["sample_id"].duplicated().any():
        raise DataError("clusters table has duplicate sample_id values")
    if (frame["cluster"] < 0).any():
        raise DataError("clusters column 'cluster' has negative ids; cluster ids must be >= 0")
    distance = frame["distance"].to_numpy(np.float64)
    if not (np.isfinite(distance) & (distance >= 0)).all():
        raise DataError("clusters column 'distance' must be finite and >= 0")
    return frame


def direction(method: str, *, balanced_order: str = "furthest") -> str:
    """One word for the sidecar: which end of the ranking is kept."""
    validate_method(method)
    if method in ("random", "cluster-random"):
        return "random"
    if method == "cluster-balanced":
        return balanced_order
    if method == SEMDEDUP:
        return "one per near-duplicate group, the least prototypical"
    if method.endswith("-mid"):
        return "middle"
    if method.startswith("cluster-"):
        return method.removeprefix("cluster-")
    return "lowest" if method.endswith("-inverse") else "highest"


def describe(method: str) -> str:
    """What `method` keeps, in words (its KEEPS entry)."""
    validate_method(method)
    score = score_of(method)
    return KEEPS[method if score is None else method.replace(score, "<score>", 1)]


def select(
    method: str,
    ratio: float,
    *,
    n: int | None = None,
    clusters: pd.DataFrame | None = None,
    scores: np.ndarray | None = None,
    seed: int = 0,
    balanced_order: str = "furthest",
    embeddings: np.ndarray | None = None,
    semdedup_eps: float | None = None,
) -> pd.DataFrame:
    """Apply a selection rule and return the prune manifest (see the module docstring).

    `clusters` is a clusters table (sample_id, cluster, distance); `scores` and `embeddings`
    (semdedup only) are aligned with the sorted sample ids (those of `clusters`, or 0..N-1). `n`,
    when given, must match the inputs.
    """
    validate_method(method)
    ratio = validate_ratio(ratio)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if balanced_order not in BALANCED_ORDERS:
        raise ConfigError(
            f"balanced_order must be one of {', '.join(BALANCED_ORDERS)}, got {balanced_order!r}"
        )
    required = needs(method)
    if "clusters" in required and clusters is None:
        raise ConfigError(f"method {method!r} needs clusters (run k-means on the embeddings)")
    if required - {"clusters", "embeddings"} and scores is None:
        raise ConfigError(f"method {method!r} needs scores ({required.pop()})")
    if n is None and clusters is None and scores is None:
        raise ConfigError(f"method {method!r} needs the number of samples n (or clusters/scores)")

    manifest = _evidence(n, clusters, scores)
    keep_fraction = 1 - Fraction(str(ratio))
    if method == SEMDEDUP:
        manifest["score"] = semdedup_similarity(
            manifest, _semdedup_embeddings(embeddings, len(manifest))
        )
        threshold = semdedup_threshold(manifest["score"].to_numpy(), ratio, semdedup_eps)
        manifest["keep"] = ~(manifest["score"].to_numpy() > threshold)  # NaN (first) is kept
        sizes = np.unique(manifest["cluster"], return_counts=True)[1]
    else:
        manifest["keep"], sizes = _rank_keep(method, manifest, keep_fraction, seed, balanced_order)

    n_kept = int(manifest["keep"].sum())
    if n_kept == 0:
        raise ConfigError(_nothing_kept(method, ratio, sizes))
    log.info("%s at ratio %g keeps %d of %d samples", method, ratio, n_kept, len(manifest))
    return manifest[list(MANIFEST_COLUMNS)]


def _rank_keep(
    method: str, manifest: pd.DataFrame, keep_fraction: Fraction, seed: int, balanced_order: str
) -> tuple[np.ndarray, np.ndarray]:
    """The keep mask of a ranking rule (all but semdedup), and its group sizes."""
    # Cluster rules act within each cluster, the others on all samples as one group.
    if method in CLUSTER_METHODS:
        groups = manifest["cluster"].to_numpy()
    else:
        groups = np.zeros(len(manifest), dtype=np.int64)
    key = _ranking_key(method, manifest, seed=seed, balanced_order=balanced_order)
    sizes = np.unique(groups, return_counts=True)[1]
    if method == "cluster-balanced":
        total = _floor(len(manifest), keep_fraction)
        kept = np.full_like(sizes, min(sizes.min(), total // len(sizes)))
    else:
        kept = np.array([_floor(size, keep_fraction) for size in sizes], dtype=np.int64)
    skip = (sizes - kept) // 2 if method.endswith("-mid") else np.zeros_like(kept)
    tiebreak = _tiebreak(method, manifest, seed)
    return _keep_ranks(groups, sizes, key, tiebreak, skip, kept), sizes


def _semdedup_embeddings(embeddings: np.ndarray | None, n: int) -> np.ndarray:
    """semdedup's embeddings: finite (N, D) rows in sample_id order, none all zeros."""
    if embeddings is None:
        raise ConfigError("method 'semdedup' needs the embeddings (cosine similarities)")
    x = np.asarray(embeddings)
    if x.ndim != 2 or len(x) != n or not np.issubdtype(x.dtype, np.floating):
        raise DataError(
            f"semdedup needs float embeddings of shape (N={n}, D), got {x.dtype} {x.shape}"
        )
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    if not np.isfinite(x).all() or (norms == 0).any():
        raise DataError("semdedup embeddings must be finite and no row all zeros (cosine)")
    return x


def semdedup_similarity(manifest: pd.DataFrame, embeddings: np.ndarray) -> np.ndarray:
    """Per sample, the largest cosine similarity to an EARLIER member of its cluster, members
    ordered least prototypical first (ascending cosine similarity to the centroid, the mean of
    the members' embeddings; ties by sample_id); NaN for each cluster's first member.

    `embeddings` rows are aligned with `manifest` (sorted by sample_id).
    """
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    clusters, sample_id = manifest["cluster"].to_numpy(), manifest["sample_id"].to_numpy()
    result = np.full(len(unit), np.nan)
    for cluster in np.unique(clusters):
        members = np.flatnonzero(clusters == cluster)
        centroid = embeddings[members].mean(axis=0)
        centroid /= max(float(np.linalg.norm(centroid)), np.finfo(np.float64).tiny)
        order = members[np.lexsort((sample_id[members], unit[members] @ centroid))]
        result[order] = _max_earlier_similarity(unit[order])
    return result


def _max_earlier_similarity(x: np.ndarray, block: int = 1024) -> np.ndarray:
    """max_{i<j} x_i . x_j for every row j (NaN for j = 0), in row blocks to bound memory."""
    best = np.full(len(x), np.nan)
    for start in range(0, len(x), block):
        stop = min(start + block, len(x))
        sim = x[start:stop] @ x[:stop].T
        sim[np.arange(start, stop)[:, None] <= np.arange(stop)[None, :]] = -np.inf
        best[start:stop] = sim.max(axis=1)
    best[0] = np.nan
    return best


def semdedup_threshold(similarity: np.ndarray, ratio: float, eps: float | None) -> float:
    """Cosine threshold above which semdedup removes: 1 - eps, or, with eps None, the
    (r+1)-th largest similarity, r = N - floor(N(1-p)) (-inf: remove every non-first member)."""
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 <= eps <= 2:
            raise ConfigError(
                f"select.semdedup_eps must be null or a number in [0, 2], got {eps!r}"
            )
        return 1.0 - float(eps)
    removed = len(similarity) - _floor(len(similarity), 1 - Fraction(str(ratio)))
    ordered = np.sort(similarity[~np.isnan(similarity)])[::-1]
    return float(ordered[removed]) if removed < len(ordered) else -math.inf


def semdedup_record(manifest: pd.DataFrame, ratio: float, eps: float | None) -> dict[str, Any]:
    """The sidecar's semdedup keys: eps as given and the threshold used (None for -inf)."""
    threshold = semdedup_threshold(manifest["score"].to_numpy(), ratio, eps)
    return {
        "semdedup_eps": eps,
        "semdedup_threshold": threshold if math.isfinite(threshold) else None,
    }


def _nothing_kept(method: str, ratio: float, sizes: np.ndarray) -> str:
    """Why `method` keeps nothing at `ratio` (group sizes `sizes`), and what would keep some.

    A manifest that keeps nothing cannot train anything: it is an error, not a warning.
    """
    n, k = int(sizes.sum()), len(sizes)
    head = f"{method} at ratio {ratio} keeps none of the {n} samples"
    if method == "cluster-balanced":
        return (
            f"{head}: m = min(smallest cluster {int(sizes.min())}, floor(floor(N(1-p)) / k = "
            f"{k})) = 0 from every cluster; allowed: a smaller ratio or fewer clusters (k)"
        )
    if method in CLUSTER_METHODS:
        largest = int(sizes.max())
        return (
            f"{head}: floor(n_c (1 - {ratio})) = 0 in each of its {k} clusters (the largest has "
            f"{largest}); allowed: ratio <= 1 - 1/{largest} = {1 - 1 / largest:.6g}, or fewer "
            "clusters (k)"
        )
    return f"{head}: floor({n} (1 - {ratio})) = 0; allowed: ratio <= 1 - 1/{n} = {1 - 1 / n:.6g}"


def full_manifest(n: int) -> pd.DataFrame:
    """The baseline manifest: all n samples kept, no evidence."""
    manifest = _evidence(n, None, None)
    manifest["keep"] = True
    return manifest[list(MANIFEST_COLUMNS)]


def manifest_summary(manifest: pd.DataFrame) -> dict:
    """Counts for the JSON sidecar: n_total, n_kept, kept_fraction, kept_per_cluster."""
    n_total = len(manifest)
    n_kept = int(manifest["keep"].sum())
    clustered = manifest[manifest["cluster"] >= 0]
    per_cluster = clustered.groupby("cluster", sort=True)["keep"].sum()
    return {
        "n_total": n_total,
        "n_kept": n_kept,
        "kept_fraction": n_kept / n_total if n_total else 0.0,
        "kept_per_cluster": {str(c): int(k) for c, k in per_cluster.items()},
    }


def rule(method: str, *, balanced_order: str = "furthest") -> dict[str, str]:
    """The sidecar's `direction` and `keeps` of a method, or of the baseline `full`."""
    if method == FULL:
        return {"direction": "all", "keeps": "every sample"}
    return {
        "direction": direction(method, balanced_order=balanced_order),
        "keeps": describe(method),
    }


def sidecar(
    manifest: pd.DataFrame,
    *,
    run: Run,
    seed: int,
    direction: str,
    keeps: str,
    compute: Mapping[str, float],
    provenance: dict[str, Any],
    k: int | None = None,
    embedder: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The manifest's JSON sidecar, one format for the workflow's runs, the fairness study's arms
    and the CLI.

    `direction` and `keeps` say what was kept (`rule`, or the arm's own); `compute` holds the wall
    seconds of every stage the selection needed (`select_seconds`, and `embeddings_seconds`,
    `clusters_seconds` or `scores_seconds`), and `total_seconds`, their sum, is added: evaluation
    reports it as the selection's cost. `extra` keys (the CLI's k-means settings, the skewed set's
    size) come after `embedder`.
    """
    return {
        "run": run.name,
        "method": run.method,
        "ratio": run.ratio,
        "seed": seed,
        "direction": direction,
        "keeps": keeps,
        "k": k,
        "embedder": embedder,
        **extra,
        **manifest_summary(manifest),
        "compute": {**compute, "total_seconds": sum(compute.values())},
        "provenance": provenance,
    }


def _floor(n: int, keep_fraction: Fraction) -> int:
    return math.floor(n * keep_fraction)


def _evidence(
    n: int | None, clusters: pd.DataFrame | None, scores: np.ndarray | None
) -> pd.DataFrame:
    """sample_id plus the evidence columns, sorted by sample_id, checked for consistent sizes."""
    if clusters is not None:
        frame = validate_clusters(clusters, n)
        sample_id = frame["sample_id"].to_numpy(np.int64)
    else:
        size = n if n is not None else len(np.asarray(scores))
        if size < 1:
            raise DataError(f"there must be at least one sample, got n={size}")
        sample_id = np.arange(size, dtype=np.int64)
    manifest = pd.DataFrame({"sample_id": sample_id})
    manifest["score"] = np.nan if scores is None else validate_scores(scores, len(sample_id))
    if clusters is None:
        manifest["cluster"] = np.int64(-1)
        manifest["distance"] = np.nan
    else:
        manifest["cluster"] = frame["cluster"].to_numpy(np.int64)
        manifest["distance"] = frame["distance"].to_numpy(np.float64)
    return manifest


def _ranking_key(
    method: str, manifest: pd.DataFrame, *, seed: int, balanced_order: str
) -> np.ndarray:
    """Per-sample key; within a group the samples are ranked by (key, tiebreak) ascending.

    "top" rules keep the first ranks, "-mid" rules a band in the middle.
    """
    if method in ("random", "cluster-random"):
        return np.random.default_rng(seed).permutation(len(manifest)).astype(np.float64)
    if method in CLUSTER_METHODS:
        distance = manifest["distance"].to_numpy()
        far_first = method == "cluster-furthest" or (
            method == "cluster-balanced" and balanced_order == "furthest"
        )
        return -distance if far_first else distance  # -mid: nearest first
    score = manifest["score"].to_numpy()
    return score if method.endswith(("-inverse", "-mid")) else -score  # -mid: lowest first


def _tiebreak(method: str, manifest: pd.DataFrame, seed: int) -> np.ndarray:
    """Order among equal keys: sample_id, except for scores, where ties are common (forgetting
    takes only as many values as there are loss records) and sample_id order would bring back
    the reference code's select-by-index bug; there a seeded random order decides."""
    if method in CLUSTER_METHODS or method == "random":
        return manifest["sample_id"].to_numpy()
    return np.random.default_rng([seed, 1]).permutation(len(manifest))


def _keep_ranks(
    groups: np.ndarray,
    sizes: np.ndarray,
    key: np.ndarray,
    tiebreak: np.ndarray,
    skip: np.ndarray,
    kept: np.ndarray,
) -> np.ndarray:
    """Rank each group by (key, tiebreak) ascending; keep ranks [skip, skip + kept) per group.

    `sizes`, `skip` and `kept` are per group, in ascending group order.
    """
    order = np.lexsort((tiebreak, key, groups))
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    rank = np.arange(len(order)) - starts
    lo = np.repeat(skip, sizes)
    keep = np.empty(len(order), dtype=bool)
    keep[order] = (rank >= lo) & (rank < lo + np.repeat(kept, sizes))
    return keep
