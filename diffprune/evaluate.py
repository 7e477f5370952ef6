"""Score one run's generated samples against cached real-image references.

Real images are first brought to the generative model's resolution (the same antialiased resize
that training uses), so that generated and real images differ only in what the model learnt.
Every metric is computed in each configured feature space and named `<metric>_<space>`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from diffprune import classifier as cnn
from diffprune.data import to_model_input, to_uint8
from diffprune.features import FEATURE_LABELS, FeatureExtractor, extract
from diffprune.metrics import (
    class_shares,
    coverage,
    frechet_distance,
    kid,
    kl_divergence,
    load_reference,
    nearest_centroid,
    novelty,
    precision_recall,
    vendi,
)

log = logging.getLogger(__name__)


def metric_key(feature: str) -> str:
    """Feature-space suffix of metric names: `fd_classifier`, `fd_efficientnet_lite0`, ..."""
    return feature.replace("-", "_")


def at_resolution(images: np.ndarray, resolution: int, *, batch_size: int = 4096) -> np.ndarray:
    """uint8 NHWC images resized to `resolution` exactly as training sees them."""
    return np.concatenate(
        [
            to_uint8(to_model_input(np.asarray(images[i : i + batch_size]), resolution))
            for i in range(0, len(images), batch_size)
        ]
    )


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
    """
    metrics: dict[str, Any] = {"num_samples": len(samples), "feature_extractors": {}}
    for feature, extractor in extractors.items():
        key = metric_key(feature)
        generated = extract(extractor, samples, batch_size=batch_size)
        test = load_reference(test_references[feature])
        train = load_reference(train_references[feature])["features"]
        precision, recall = precision_recall(test["features"], generated, k=pr_k)
        metrics |= {
            f"fd_{key}": frechet_distance(generated, test),
            f"kid_{key}": kid(generated, test["features"]),
            f"precision_{key}": precision,
            f"recall_{key}": recall,
            f"vendi_{key}": vendi(generated),
        }
        metrics |= {f"{k}_{key}": v for k, v in novelty(generated, train).items()}
        kept = novelty(generated, train[kept_ids])
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
    """Shares of the classes the evaluation classifier sees in the samples, against the data's."""
    model = cnn.load_classifier(classifier_path)
    num_classes = int(model.config["num_classes"])
    generated = class_shares(cnn.predict(model, samples), num_classes)
    real = class_shares(np.asarray(train_labels), num_classes)
    return {
        "class_shares": generated.round(6).tolist(),
        "class_kl": kl_divergence(real, generated),
        "class_share_min": float(generated.min()),
    }
