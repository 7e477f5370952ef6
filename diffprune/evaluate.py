"""Score one run's generated samples against cached real-image references.

Real images are first brought to the generative model's resolution (the same antialiased resize
that training uses), so that generated and real images differ only in what the model learnt.
Every metric is computed in each configured feature space and named `<metric>_<space>`.

A failed run (failed training, or samples that `check_samples` refuses) gets no metric at all:
its metrics JSON has the run's identity keys, "status": "failed" and the reason, so no number of
a broken model can pass for a result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from diffprune import classifier as cnn
from diffprune import machine, status
from diffprune.features import FEATURE_LABELS, FeatureExtractor, extract
from diffprune.metrics import (
    class_shares,
    coverage,
    frechet_distance,
    kid,
    kl_divergence,
    load_reference,
    near_copy_threshold,
    nearest_centroid,
    novelty,
    precision_recall,
    vendi,
)

log = logging.getLogger(__name__)

# Samples whose mean per-pixel std across samples is below this share of their value range are
# "all the same image"; only the first IDENTICAL_CHECK_SAMPLES are compared (bounded memory).
IDENTICAL_TOLERANCE = 1e-3
IDENTICAL_CHECK_SAMPLES = 256


def metric_key(feature: str) -> str:
    """Feature-space suffix of metric names: `fd_classifier`, `fd_efficientnet_lite0`, ..."""
    return feature.replace("-", "_")


def check_samples(samples: np.ndarray) -> str | None:
    """Why `samples` (N, H, W, C) cannot be evaluated, or None: empty, non-finite (float input),
    constant (every pixel the same value, e.g. all zeros) or all samples (nearly) identical."""
    samples = np.asarray(samples)
    if samples.size == 0:
        return f"no samples: empty array of shape {samples.shape}"
    if np.issubdtype(samples.dtype, np.floating):
        bad = samples.size - np.count_nonzero(np.isfinite(samples))
        if bad:
            return f"{bad} of {samples.size} sample values are not finite"
    low, high = float(samples.min()), float(samples.max())
    if low == high:
        return f"every pixel of every sample is {samples.flat[0]} (constant images)"
    first = samples[:IDENTICAL_CHECK_SAMPLES]
    spread = float(first.std(axis=0, dtype=np.float64).mean())
    if len(first) > 1 and spread <= IDENTICAL_TOLERANCE * (high - low):
        return f"all samples are (nearly) identical: mean per-pixel std {spread:.3g} across them"
    return None


def run_failure(training: Mapping[str, Any], samples: np.ndarray) -> str | None:
    """Why a run has no metrics (its train.json record says it failed, or its samples are bad)."""
    failure = status.failure(training)
    if failure is not None:
        return f"training failed: {failure}"
    reason = check_samples(samples)
    return None if reason is None else f"bad samples: {reason}"


def metrics_record(
    *,
    selection: Mapping[str, Any],
    training: Mapping[str, Any],
    samples: np.ndarray,
    compute_metrics: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """One run's metrics JSON: its identity keys, then "status": "ok" and `compute_metrics()`, or
    "status": "failed" and "failure" (why) without calling it.

    `selection` is the manifest's meta JSON, `training` the model's train.json record.
    """
    record = {
        "run": selection["run"],
        "method": selection["method"],
        "ratio": selection["ratio"],
        "seed": selection["seed"],
        "n_total": selection["n_total"],
        "n_kept": selection["n_kept"],
        "kept_fraction": selection["kept_fraction"],
        "selection_seconds": selection["compute"]["total_seconds"],
        "train_seconds": training.get("wall_seconds"),  # None when training failed
        "train_steps": training["steps"],
        # float32 training is not bitwise reproducible across CPU types: the report names these
        "train_machine": machine.label(training["machine"]) if "machine" in training else None,
    }
    reason = run_failure(training, samples)
    if reason is not None:
        log.error("run %s seed %s has no metrics: %s", record["run"], record["seed"], reason)
        return {**record, "status": status.FAILED, "failure": reason}
    return {**record, "status": status.OK, **compute_metrics()}


def evaluate_samples(
    samples: np.ndarray,
    *,
    extractors: Mapping[str, FeatureExtractor],
    test_references: Mapping[str, str | os.PathLike],
    train_references: Mapping[str, str | os.PathLike],
    modes: Mapping[str, str | os.PathLike],
    kept_ids: np.ndarray,
    batch_size: int = 256,
    pr_k: int = 3,
) -> dict[str, Any]:
    """Fidelity, diversity, novelty and mode coverage of `samples` in every feature space.

    Per space `s`: `fd_s`, `kid_s` and `precision_s`/`recall_s` against the held-out test images;
    `vendi_s` of the samples; `novelty_*_s` (nearest-neighbour distance to the full training set
    and `novelty_kept_*_s` to the kept subset); `mode_coverage_s` and `occupancy_kl_s` against
    k-means modes of the full training set.

    What depends only on the real data comes from the reference files when they hold it
    (`metrics.reference_neighbours`, written by the reference rule): the test set's
    precision/recall radii and the training set's nearest neighbours, from which the near-copy
    thresholds of the full and the kept training set follow. The metrics are the same either way.
    """
    metrics: dict[str, Any] = {"num_samples": len(samples), "feature_extractors": {}}
    for feature, extractor in extractors.items():
        key = metric_key(feature)
        generated = extract(extractor, samples, batch_size=batch_size)
        test = load_reference(test_references[feature])
        train_reference = load_reference(train_references[feature])
        train = train_reference["features"]
        stored_k = test.get("pr_k")
        radii2 = test["knn_radii2"] if stored_k is not None and int(stored_k) == pr_k else None
        precision, recall = precision_recall(
            test["features"], generated, k=pr_k, real_radii2=radii2
        )
        neighbours = train_reference.get("neighbours")
        metrics |= {
            f"fd_{key}": frechet_distance(generated, test),
            f"kid_{key}": kid(generated, test["features"]),
            f"precision_{key}": precision,
            f"recall_{key}": recall,
            f"vendi_{key}": vendi(generated),
        }
        threshold = near_copy_threshold(train, neighbours=neighbours)
        full = novelty(generated, train, copy_threshold=threshold)
        metrics |= {f"{k}_{key}": v for k, v in full.items()}
        kept_threshold = near_copy_threshold(train, rows=kept_ids, neighbours=neighbours)
        kept = novelty(generated, train[kept_ids], copy_threshold=kept_threshold)
        metrics |= {f"novelty_kept_{k.removeprefix('novelty_')}_{key}": v for k, v in kept.items()}
        centroids = np.load(modes[feature])
        real_assign = nearest_centroid(train, centroids)
        gen_assign = nearest_centroid(generated, centroids)
        metrics |= {
            f"{k}_{key}": v for k, v in coverage(gen_assign, real_assign, k=len(centroids)).items()
        }
        metrics["feature_extractors"][key] = FEATURE_LABELS[feature]
        metrics["num_reference"] = len(test["features"])
        log.info("%s: FD %.3f", FEATURE_LABELS[feature], metrics[f"fd_{key}"])
    return metrics


def class_balance(
    samples: np.ndarray, *, classifier_path: str | os.PathLike, train_labels: np.ndarray
) -> dict[str, Any]:
    """Shares of the classes the evaluation classifier sees in the samples, against the data's.

    `class_share_ratio_min` is the smallest generated/training share ratio over the classes the
    training data has: 1 when every class is generated at least as often as it is in the data,
    0 when one is never generated (the baseline quality floor reads it).
    """
    model = cnn.load_classifier(classifier_path)
    num_classes = int(model.config["num_classes"])
    generated = class_shares(cnn.predict(model, samples), num_classes)
    real = class_shares(np.asarray(train_labels), num_classes)
    present = real > 0
    return {
        "class_shares": generated.round(6).tolist(),
        "class_shares_train": real.round(6).tolist(),
        "class_kl": kl_divergence(real, generated),
        "class_share_min": float(generated.min()),
        "class_share_ratio_min": float((generated[present] / real[present]).min()),
    }
