"""Snakemake script for rule `reference`: held-out real features and statistics in one space."""

import numpy as np

from diffprune.data import load_store
from diffprune.features import extract, load_feature_extractor
from diffprune.logs import setup
from diffprune.metrics import reference_stats, save_reference

setup(snakemake.log[0], threads=snakemake.threads)
cfg = snakemake.params.evaluate
store = load_store(snakemake.input.store[0].rsplit("/", 1)[0])
extractor = load_feature_extractor(
    snakemake.wildcards.feature,
    resolution=snakemake.params.resolution,
    classifier_path=snakemake.input.get("classifier"),
    image_size=cfg.get("image_size", 64),
    inception_weights=cfg.get("inception_weights"),
    device=cfg.get("device", "auto"),
)
features = extract(extractor, np.asarray(store.images), batch_size=cfg.get("batch_size", 256))
save_reference(snakemake.output[0], reference_stats(features))
