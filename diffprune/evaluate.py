"""Score one run's generated samples against the cached held-out references."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from diffprune.features import FEATURE_LABELS, extract, load_feature_extractor
from diffprune.metrics import frechet_distance, kid, load_reference

log = logging.getLogger(__name__)


def metric_key(feature: str) -> str:
    """Feature-space suffix of metric names: `fd_classifier`, `fd_efficientnet_lite0`, ..."""
    return feature.replace("-", "_")


def evaluate_samples(
    samples: np.ndarray,
    *,
    references: Mapping[str, str | os.PathLike],
    resolution: int,
    classifier_path: str | os.PathLike | None = None,
    image_size: int = 64,
    inception_weights: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
) -> dict[str, Any]:
    """Fréchet distance and KID in every feature space of `references` (feature -> .npz)."""
    metrics: dict[str, Any] = {"num_samples": len(samples), "feature_extractors": {}}
    for feature, reference_path in references.items():
        extractor = load_feature_extractor(
            feature,
            resolution=resolution,
            classifier_path=classifier_path,
            image_size=image_size,
            inception_weights=inception_weights,
            device=device,
        )
        generated = extract(extractor, samples, batch_size=batch_size)
        reference = load_reference(reference_path)
        key = metric_key(feature)
        metrics[f"fd_{key}"] = frechet_distance(generated, reference)
        metrics[f"kid_{key}"] = kid(generated, reference["features"])
        metrics["feature_extractors"][key] = FEATURE_LABELS[feature]
        metrics["num_reference"] = len(reference["features"])
        log.info("%s: FD %.3f", FEATURE_LABELS[feature], metrics[f"fd_{key}"])
    return metrics
