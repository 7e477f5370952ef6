"""Snakemake script for rule `evaluate`: one flat metrics JSON per run and seed.

A failed run (failed training or bad samples) gets "status": "failed" and no metric numbers.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from diffprune import io
from diffprune.evaluate import class_balance, evaluate_samples, metrics_record
from diffprune.features import load_feature_extractor
from diffprune.logs import setup
from diffprune.manifest import read_manifest

setup(snakemake.log[0], threads=snakemake.threads)
cfg = snakemake.params.evaluate
inputs = snakemake.input
features = cfg["features"]
manifest = read_manifest(inputs.manifest)
samples = np.load(inputs.samples)


def compute_metrics() -> dict:
    extractors = {
        feature: load_feature_extractor(
            feature,
            resolution=snakemake.params.resolution,
            classifier_path=inputs.get("classifier"),
            image_size=cfg["image_size"],
            inception_weights=cfg["inception_weights"],
            device=cfg["device"],
        )
        for feature in features
    }
    metrics = evaluate_samples(
        samples,
        extractors=extractors,
        test_references=dict(zip(features, inputs.test_references, strict=True)),
        train_references=dict(zip(features, inputs.train_references, strict=True)),
        modes=dict(zip(features, inputs.modes, strict=True)),
        kept_ids=manifest.loc[manifest["keep"], "sample_id"].to_numpy(),
        batch_size=cfg["batch_size"],
    )
    if inputs.get("classifier"):
        labels = pd.read_parquet(inputs.train_index, columns=["label"])["label"].to_numpy()
        metrics |= class_balance(samples, classifier_path=inputs.classifier, train_labels=labels)
    return metrics


io.save_json(
    snakemake.output[0],
    metrics_record(
        selection=io.load_json(inputs.manifest_meta),
        training=io.load_json(Path(inputs.model) / "train.json"),
        samples=samples,
        compute_metrics=compute_metrics,
    ),
)
