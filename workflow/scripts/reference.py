"""Snakemake script for rule `reference`: one split's real images in one feature space.

Besides mean, covariance and features it stores the split's neighbour statistics
(`metrics.reference_neighbours`), so that no evaluation job recomputes them.
"""

from diffprune.data import load_store
from diffprune.features import extract, load_feature_extractor
from diffprune.logs import setup
from diffprune.metrics import reference_neighbours, reference_stats, save_reference

setup(snakemake.log[0], threads=snakemake.threads)
cfg, resolution = snakemake.params.evaluate, snakemake.params.resolution
store = load_store(snakemake.input.store[0].rsplit("/", 1)[0])
extractor = load_feature_extractor(
    snakemake.wildcards.feature,
    resolution=resolution,
    classifier_path=snakemake.input.get("classifier"),
    image_size=cfg["image_size"],
    inception_weights=cfg["inception_weights"],
    device=cfg["device"],
)
# batch by batch from the memory-mapped store, each resized as training sees it
features = extract(extractor, store.images, batch_size=cfg["batch_size"], resolution=resolution)
save_reference(snakemake.output[0], reference_stats(features) | reference_neighbours(features))
