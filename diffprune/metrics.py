"""Sample-quality, diversity, novelty and balance metrics on feature arrays (numpy in, floats out).

Fréchet distance and KID give clean-fid's numbers (`cleanfid.fid.frechet_distance`,
`cleanfid.fid.kernel_distance`; the tests compare them) at a fraction of the cost: the trace of
sqrt(S1 S2) comes from the eigenvalues of the symmetric sqrt(S1) S2 sqrt(S1) instead of a
general matrix square root (about 4x faster at 1280 dimensions, `make bench`), and KID reads its 100
random subsets' kernels out of Gram matrices computed once instead of three products per subset.
Which feature space they are computed in (and therefore what a table should call them) is
decided by `diffprune.features`.

A reference file (`save_reference`) can also hold neighbour statistics of its own rows
(`reference_neighbours`): the k-th neighbour radii that precision/recall needs and each row's
nearest other rows, from which the training set's near-copy threshold, also for any kept subset,
follows without another pass over all pairs. The reference rule computes them once per feature
space; every evaluation job reuses them.

Pairwise distances are computed in row chunks of at most `batch_size` queries (float64, via
|a|^2 + |b|^2 - 2ab), fewer when the other set is large, so that one chunk's distance matrix
never exceeds `MAX_CHUNK_CELLS` entries (128 MB): 10k x 10k or 12.8k x 60k sets never need the
full matrix.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Mapping

import numpy as np

from diffprune.errors import DataError
from diffprune.io import atomic_path

STATS_KEYS = ("mu", "sigma", "features")
#: Optional keys of a reference file: `reference_neighbours`' output.
NEIGHBOUR_KEYS = ("pr_k", "knn_radii2", "neighbours")

#: k of precision/recall (Kynkäänniemi et al.'s default); the radii a reference stores.
PR_K = 3
#: Nearest other rows kept per reference row: a kept subset's nearest neighbour of a row is the
#: first kept one in its list (a row with none kept is searched in full).
NEIGHBOURS = 16
#: KID reads the second set's subsets from its full Gram matrix up to this many rows (128 MB).
KID_GRAM_ROWS = 4096

#: Added to every bin of the second distribution before KL, so a missing class or mode gives a
#: large finite divergence (about p_c * log(p_c / eps) per missing bin) instead of infinity.
KL_EPS = 1e-6

MAX_CHUNK_CELLS = 2**24


# --- reference statistics -------------------------------------------------------------------


def reference_stats(features: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, covariance and the features themselves (KID and precision/recall need them)."""
    feats = _features(features, "features", min_rows=2)
    return {"mu": feats.mean(axis=0), "sigma": np.cov(feats, rowvar=False), "features": feats}


def reference_neighbours(
    features: np.ndarray,
    *,
    k: int = PR_K,
    neighbours: int = NEIGHBOURS,
    batch_size: int = 1024,
) -> dict[str, np.ndarray]:
    """Neighbour statistics of a reference set, in one pass over all pairs of its rows.

    `knn_radii2`: each row's squared distance to its k-th nearest row (itself counted first), the
    ball radius of precision/recall; `pr_k`: that k. `neighbours`: each row's nearest other rows,
    nearest first (int64, (N, min(neighbours, N - 1))), for `near_copy_threshold`.
    """
    x = _features(features, "features", min_rows=max(k + 1, 2))
    count = min(neighbours, len(x) - 1)
    radii2, nearest = [], []
    for start, chunk in _chunks(x, batch_size, x):
        d = _squared_distances(chunk, x)
        radii2.append(np.partition(d, k, axis=1)[:, k])
        d[np.arange(len(chunk)), np.arange(start, start + len(chunk))] = np.inf
        top = np.argpartition(d, count - 1, axis=1)[:, :count]
        order = np.argsort(np.take_along_axis(d, top, axis=1), axis=1, kind="stable")
        nearest.append(np.take_along_axis(top, order, axis=1))
    return {
        "pr_k": np.array(k, dtype=np.int64),
        "knn_radii2": np.concatenate(radii2),
        "neighbours": np.concatenate(nearest).astype(np.int64),
    }


def save_reference(path: str | os.PathLike, stats: Mapping[str, np.ndarray]) -> None:
    """Write the stats as an .npz pipeline artifact (atomic, byte-identical for equal stats).

    `stats` holds STATS_KEYS and optionally NEIGHBOUR_KEYS (all of them or none). This is a
    pipeline artifact under the workflow's data folder: unlike clean-fid's own reference
    statistics it never goes into an installed package's folder.
    """
    missing = [key for key in STATS_KEYS if key not in stats]
    if missing:
        raise ValueError(f"stats lack {missing}; expected keys {list(STATS_KEYS)}")
    optional = [key for key in NEIGHBOUR_KEYS if key in stats]
    if optional and len(optional) != len(NEIGHBOUR_KEYS):
        raise ValueError(f"stats have {optional} of the neighbour keys {list(NEIGHBOUR_KEYS)}")
    # np.savez stamps the current time into the zip entries; fixed dates keep the bytes stable.
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for key in STATS_KEYS + tuple(optional):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(stats[key], order="C"), allow_pickle=False)


def load_reference(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """STATS_KEYS, plus NEIGHBOUR_KEYS when the file has them."""
    if not os.path.exists(path):
        raise DataError(f"reference statistics {str(path)!r} do not exist; run the stats step")
    with np.load(path, allow_pickle=False) as npz:
        missing = [key for key in STATS_KEYS if key not in npz.files]
        if missing:
            raise DataError(f"reference statistics {str(path)!r} lack {missing}")
        return {key: npz[key] for key in STATS_KEYS + NEIGHBOUR_KEYS if key in npz.files}


# --- distribution distances -----------------------------------------------------------------


def frechet_distance(
    feats_or_stats_a: np.ndarray | Mapping[str, np.ndarray],
    feats_or_stats_b: np.ndarray | Mapping[str, np.ndarray],
) -> float:
    """Fréchet distance between two feature sets, each given as (N,D) features or stats dicts.

    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a S_b)), where tr(sqrt(S_a S_b)) is the
    sum of the square roots of the eigenvalues of S_a S_b, which are those of the symmetric
    positive semi-definite R S_b R with R = sqrt(S_a) (both from `eigh`). Eigenvalues that
    rounding makes slightly negative (singular covariances, N <= D) count as 0.
    """
    mu_a, sigma_a = _mu_sigma(feats_or_stats_a)
    mu_b, sigma_b = _mu_sigma(feats_or_stats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dims differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    product = root_a @ sigma_b @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean)


def kid(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    *,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> float:
    """Kernel Inception Distance (clean-fid's unbiased cubic-kernel MMD over random subsets).

    The value of `cleanfid.fid.kernel_distance(feats_a, feats_b, ...)` after
    `np.random.seed(seed)`: the same subsets, drawn in the same order from a private
    `RandomState(seed)`, so numpy's global generator is untouched. Each subset's kernel sums are
    read from Gram matrices of the whole sets (the second set's only up to KID_GRAM_ROWS rows).
    """
    a = _features(feats_a, "feats_a", min_rows=2)
    b = _features(feats_b, "feats_b", min_rows=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    dim, m = a.shape[1], min(len(a), len(b), max_subset_size)
    rng = np.random.RandomState(seed)
    gram_a, gram_ba = a @ a.T, b @ a.T
    gram_b = b @ b.T if len(b) <= KID_GRAM_ROWS else None
    total = 0.0
    for _ in range(num_subsets):
        ix = rng.choice(len(b), m, replace=False)  # clean-fid draws x from feats2 first
        iy = rng.choice(len(a), m, replace=False)
        xx = gram_b[np.ix_(ix, ix)] if gram_b is not None else b[ix] @ b[ix].T
        within = (xx / dim + 1) ** 3 + (gram_a[np.ix_(iy, iy)] / dim + 1) ** 3
        between = (gram_ba[np.ix_(ix, iy)] / dim + 1) ** 3
        total += (within.sum() - np.diag(within).sum()) / (m - 1) - between.sum() * 2 / m
    return float(total / num_subsets / m)


def precision_recall(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    k: int = PR_K,
    batch_size: int = 1024,
    real_radii2: np.ndarray | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), k-NN manifold estimate.

    Each sample of a set spans a ball whose radius is the distance to its k-th nearest neighbour
    in the same set (itself excluded). Precision is the share of `fake` samples inside at least
    one ball of `real`; recall is the share of `real` samples inside at least one ball of `fake`.
    `real_radii2`: the real balls' squared radii for this k, if already known
    (`reference_neighbours`' `knn_radii2`).
    """
    real = _features(real, "real", min_rows=k + 1)
    fake = _features(fake, "fake", min_rows=k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
    if k < 1:
        raise ValueError(f"k={k}; must be >= 1")
    if real_radii2 is None:
        real_radii2 = _kth_neighbour_sq_distance(real, k, batch_size)
    elif np.shape(real_radii2) != (len(real),):
        raise ValueError(f"real_radii2 has shape {np.shape(real_radii2)}; expected ({len(real)},)")
    fake_radii2 = _kth_neighbour_sq_distance(fake, k, batch_size)
    precision = _share_inside(fake, real, real_radii2, batch_size)
    recall = _share_inside(real, fake, fake_radii2, batch_size)
    return precision, recall


# --- diversity and novelty ------------------------------------------------------------------


def vendi(features: np.ndarray) -> float:
    """Vendi score: exp of the entropy of the eigenvalues of K/n, K the cosine-similarity kernel.

    It is the effective number of distinct samples: 1 when all are identical, m for m equally
    sized groups of identical, mutually orthogonal points. The eigenvalues come from the smaller
    of X X^T / n and X^T X / n (they share their non-zero spectrum), so n = 10k costs (D, D).
    """
    x = _features(features, "features", min_rows=1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} feature row(s) are all zero; cosine undefined")
    x = x / norms
    n, d = x.shape
    gram = (x.T @ x if d < n else x @ x.T) / n
    eigenvalues = np.linalg.eigvalsh(gram)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(np.exp(-np.sum(eigenvalues * np.log(eigenvalues))))


def novelty(
    generated: np.ndarray,
    train: np.ndarray,
    *,
    copy_threshold: float | None = None,
    threshold_quantile: float = 0.01,
    threshold_subset: int = 2000,
    seed: int = 0,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Nearest-neighbour Euclidean distance of each generated sample to the training set.

    Returns `novelty_mean` and `novelty_median` (higher = more novel), `near_copy_share` (share
    of generated samples with distance <= the threshold) and `near_copy_threshold`.

    Default threshold (`copy_threshold=None`): the `threshold_quantile` (1 %) quantile of the
    training set's own nearest-neighbour distances (self excluded), measured on a seeded random
    subset of `threshold_subset` training samples against the whole training set. A generated
    sample is a near copy when it is closer to a training image than 99 % of training images are
    to their nearest other training image (`near_copy_threshold`, which can reuse precomputed
    neighbours). Exact duplicates inside the training set can make this threshold 0, in which
    case only exact copies count.
    """
    gen = _features(generated, "generated", min_rows=1)
    ref = _features(train, "train", min_rows=1 if copy_threshold is not None else 2)
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f"feature dims differ: {gen.shape[1]} vs {ref.shape[1]}")
    distances = _nearest_distance(gen, ref, batch_size)
    if copy_threshold is None:
        copy_threshold = near_copy_threshold(
            ref,
            quantile=threshold_quantile,
            subset=threshold_subset,
            seed=seed,
            batch_size=batch_size,
        )
    return {
        "novelty_mean": float(distances.mean()),
        "novelty_median": float(np.median(distances)),
        "near_copy_share": float((distances <= copy_threshold).mean()),
        "near_copy_threshold": float(copy_threshold),
    }


def near_copy_threshold(
    train: np.ndarray,
    *,
    rows: np.ndarray | None = None,
    neighbours: np.ndarray | None = None,
    quantile: float = 0.01,
    subset: int = 2000,
    seed: int = 0,
    batch_size: int = 1024,
) -> float:
    """`quantile` of the nearest-neighbour distances (self excluded) within the training set
    `train[rows]` (all of `train` when `rows` is None), measured for a seeded random `subset`
    of its rows: `novelty`'s default near-copy threshold.

    `neighbours` (`reference_neighbours` of all of `train`) makes it cheap: a row's nearest
    neighbour within `train[rows]` is the first of its listed neighbours that is in `rows`; only
    rows none of whose listed neighbours is in `rows` are searched in full. The result is the
    same as without `neighbours`.
    """
    members = np.arange(len(train)) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(members) < 2:
        raise ValueError(f"the training set has {len(members)} row(s); the threshold needs >= 2")
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(members), size=min(subset, len(members)), replace=False))
    if neighbours is None:
        sub = train[members]
        distances = _nearest_distance(sub[picked], sub, batch_size, exclude=picked)
        return float(np.quantile(distances, quantile))
    if neighbours.ndim != 2 or len(neighbours) != len(train):
        raise ValueError(
            f"neighbours has shape {neighbours.shape}; expected ({len(train)}, K) for train"
        )
    is_member = np.zeros(len(train), dtype=bool)
    is_member[members] = True
    queries = members[picked]
    listed = is_member[neighbours[queries]]
    found = listed.any(axis=1)
    nearest = neighbours[queries, listed.argmax(axis=1)]
    distances = np.linalg.norm(train[queries] - train[nearest], axis=1)
    if not found.all():
        missing = picked[~found]
        sub = train[members]
        distances[~found] = _nearest_distance(sub[missing], sub, batch_size, exclude=missing)
    return float(np.quantile(distances, quantile))


# --- balance: clusters and classes ----------------------------------------------------------


def nearest_centroid(
    features: np.ndarray, centroids: np.ndarray, *, batch_size: int = 1024
) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) for each row: assigns generated samples to the
    clusters of the real data, for `coverage`."""
    x = _features(features, "features", min_rows=1)
    c = _features(centroids, "centroids", min_rows=1)
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"feature dims differ: {x.shape[1]} vs centroids {c.shape[1]}")
    return np.concatenate(
        [_squared_distances(chunk, c).argmin(axis=1) for _, chunk in _chunks(x, batch_size, c)]
    ).astype(np.int64)


def coverage(generated_assign: np.ndarray, real_assign: np.ndarray, *, k: int) -> dict[str, float]:
    """How well generated samples occupy the real data's clusters (cluster ids 0..k-1).

    `mode_coverage`: share of the clusters holding real data that hold at least one generated
    sample. `occupancy_kl`: KL(real occupancy || generated occupancy), smoothed by `KL_EPS`.
    """
    real_shares = class_shares(real_assign, k)
    generated_shares = class_shares(generated_assign, k)
    populated = real_shares > 0
    return {
        "mode_coverage": float((generated_shares[populated] > 0).mean()),
        "occupancy_kl": kl_divergence(real_shares, generated_shares),
    }


def class_shares(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of each label 0..num_classes-1, float64 (num_classes,) summing to 1."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a non-empty 1-d integer array, got {labels.dtype}{labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels span {labels.min()}..{labels.max()}; allowed 0..{num_classes - 1}"
        )
    return np.bincount(labels, minlength=num_classes) / labels.size


def kl_divergence(p: np.ndarray, q: np.ndarray, *, eps: float = KL_EPS) -> float:
    """KL(p || q) in nats. Both are normalised to sum 1 (counts are fine); then `eps` is added
    to every bin of q and q is renormalised, so empty bins of q give a finite value."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"p and q must be 1-d of equal length, got {p.shape} and {q.shape}")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("p and q must be non-negative with positive total mass")
    p = p / p.sum()
    q = (q / q.sum() + eps) / (1.0 + eps * q.size)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


# --- helpers --------------------------------------------------------------------------------


def _features(x: np.ndarray, name: str, *, min_rows: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < min_rows:
        raise ValueError(f"{name} has shape {x.shape}; expected (N, D) with N >= {min_rows}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _mu_sigma(x: np.ndarray | Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(x, Mapping):
        if "mu" not in x or "sigma" not in x:
            raise ValueError(f"stats dict has keys {sorted(x)}; expected 'mu' and 'sigma'")
        return np.asarray(x["mu"], dtype=np.float64), np.asarray(x["sigma"], dtype=np.float64)
    stats = reference_stats(x)
    return stats["mu"], stats["sigma"]


def _chunks(x: np.ndarray, batch_size: int, other: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(start, rows of x) such that rows x `other` distances stay under MAX_CHUNK_CELLS."""
    rows = max(1, min(batch_size, MAX_CHUNK_CELLS // len(other)))
    for start in range(0, len(x), rows):
        yield start, x[start : start + rows]


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _kth_neighbour_sq_distance(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance of each row to its k-th nearest other row (index k; index 0 is itself)."""
    radii2 = [
        np.partition(_squared_distances(chunk, x), k, axis=1)[:, k]
        for _, chunk in _chunks(x, batch_size, x)
    ]
    return np.concatenate(radii2)


def _share_inside(
    queries: np.ndarray, centres: np.ndarray, radii2: np.ndarray, batch_size: int
) -> float:
    """Share of queries within at least one ball (centre j, squared radius radii2[j])."""
    inside = [
        (_squared_distances(chunk, centres) <= radii2[None, :]).any(axis=1)
        for _, chunk in _chunks(queries, batch_size, centres)
    ]
    return float(np.concatenate(inside).mean())


def _nearest_distance(
    queries: np.ndarray, ref: np.ndarray, batch_size: int, *, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Euclidean distance of each query to its nearest row of `ref`.

    The neighbour is found with the fast matrix formula, then its distance is recomputed
    directly, so exact copies give exactly 0. `exclude[i]` is a row of `ref` that query i may
    not match (itself, when queries are drawn from ref).
    """
    nearest = []
    for start, chunk in _chunks(queries, batch_size, ref):
        d = _squared_distances(chunk, ref)
        if exclude is not None:
            d[np.arange(len(chunk)), exclude[start : start + len(chunk)]] = np.inf
        nearest.append(d.argmin(axis=1))
    return np.linalg.norm(queries - ref[np.concatenate(nearest)], axis=1)
