"""The fairness experiment: build a skewed training set, then rebalance it with and without labels.

Arms (each a prune manifest over the full training store, `keep` = trained on):
- `skewed`: the whole skewed set (what a user with skewed data has);
- `random`: a uniformly random `keep`-sized subset of it;
- `cluster-balanced`: k-means on the skewed set's embeddings (no labels), then the same number of
  samples from every cluster (diffprune.select's cluster-balanced rule), about `keep` in all;
- `label-balanced`: the oracle that sees labels: `keep // classes` per class (all of a class that
  has fewer).
Every arm trains for the same number of steps (the paper's equal-budget rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from diffprune.cluster import clusters_frame, kmeans
from diffprune.errors import ConfigError
from diffprune.names import SKEW_ARMS
from diffprune.select import MANIFEST_COLUMNS, full_manifest, select

# What each arm keeps, for its manifest's sidecar (select.sidecar's `direction` and `keeps`).
ARM_RULES = {
    "skewed": {"direction": "all", "keeps": "the whole skewed set"},
    "random": {"direction": "random", "keeps": "a uniformly random `keep` of the skewed set"},
    "cluster-balanced": {
        "direction": "furthest",
        "keeps": "the same number from every k-means cluster of the skewed set's embeddings (no "
        "labels), the furthest from the centroid",
    },
    "label-balanced": {
        "direction": "random",
        "keeps": "a random `keep // classes` of every class (the oracle that sees labels)",
    },
}


def group_sizes(total: int, groups: int) -> np.ndarray:
    """Split `total` into `groups` integer parts that differ by at most one (first ones larger)."""
    return np.full(groups, total // groups) + (np.arange(groups) < total % groups)


def skewed_ids(
    labels: np.ndarray,
    *,
    minority_classes: Sequence[int],
    minority_share: float,
    size: int,
    seed: int = 0,
) -> np.ndarray:
    """Sorted sample ids of a skewed set of exactly `size` samples.

    round(minority_share * size) samples come from the minority classes and the rest from the
    others, each group split evenly over its classes; within a class the samples are random.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels[labels >= 0])
    minority = np.asarray(sorted(minority_classes))
    if not np.isin(minority, classes).all() or len(minority) == 0:
        raise ConfigError(
            f"skew.minority_classes = {list(minority)}; labels present: {list(classes)}"
        )
    majority = np.setdiff1d(classes, minority)
    n_minority = round(minority_share * size)
    wanted = dict(zip(minority, group_sizes(n_minority, len(minority)), strict=True))
    wanted |= dict(zip(majority, group_sizes(size - n_minority, len(majority)), strict=True))
    rng = np.random.default_rng(seed)
    chosen = []
    for label, count in sorted(wanted.items()):
        members = np.flatnonzero(labels == label)
        if count > len(members):
            raise ConfigError(
                f"skew: class {label} needs {count} samples but the train store has "
                f"{len(members)}; lower skew.size or raise data.train_size"
            )
        chosen.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(chosen))


def arm_ids(
    arm: str,
    *,
    skewed: np.ndarray,
    labels: np.ndarray,
    embeddings: np.ndarray,
    keep: int,
    k: int,
    iterations: int = 50,
    seed: int = 0,
) -> tuple[np.ndarray, pd.DataFrame | None]:
    """The sample ids an arm trains on, and for cluster-balanced its clusters of the skewed set."""
    if arm not in SKEW_ARMS:
        raise ConfigError(f"skew arm {arm!r}; allowed: {', '.join(SKEW_ARMS)}")
    if arm != "skewed" and not 0 < keep <= len(skewed):
        raise ConfigError(f"skew.keep = {keep}: must be in 1..{len(skewed)} (the skewed set size)")
    rng = np.random.default_rng(seed)
    if arm == "skewed":
        return skewed, None
    if arm == "random":
        return np.sort(rng.choice(skewed, size=keep, replace=False)), None
    if arm == "label-balanced":
        per_class = keep // len(np.unique(labels[skewed]))
        picked = [
            rng.permutation(np.flatnonzero(labels[skewed] == c))[:per_class]
            for c in np.unique(labels[skewed])
        ]
        return np.sort(skewed[np.concatenate(picked)]), None
    clustering = kmeans(embeddings[skewed], k=k, iterations=iterations, seed=seed)
    clusters = clusters_frame(clustering).assign(sample_id=skewed)
    manifest = select(
        "cluster-balanced", _removed_fraction(keep, len(skewed)), clusters=clusters, seed=seed
    )
    return manifest.loc[manifest["keep"], "sample_id"].to_numpy(), clusters


def arm_manifest(n_total: int, kept_ids: np.ndarray, clusters: pd.DataFrame | None) -> pd.DataFrame:
    """A manifest over the whole train store: `keep` marks the arm's samples."""
    manifest = full_manifest(n_total)
    manifest["keep"] = np.isin(manifest["sample_id"].to_numpy(), kept_ids)
    if clusters is not None:
        evidence = clusters.set_index("sample_id")
        manifest.loc[evidence.index, "cluster"] = evidence["cluster"].to_numpy()
        manifest.loc[evidence.index, "distance"] = evidence["distance"].to_numpy(np.float64)
    return manifest[list(MANIFEST_COLUMNS)]


def _removed_fraction(keep: int, n: int) -> float:
    """The ratio that makes `select` keep `keep` of `n`. `select` floors n * (1 - ratio) exactly
    from the ratio's decimal text, so 1 - 30/90 (0.6666666666666667) would keep 29: round the
    removed fraction down to 12 decimals instead, which keeps `keep` for any n below 10**11."""
    return math.floor((n - keep) / n * 10**12) / 10**12
