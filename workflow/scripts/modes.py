"""Snakemake script for rule `modes`: k-means centroids of the training features."""

import faiss
import numpy as np

from diffprune import io
from diffprune.cluster import kmeans
from diffprune.logs import setup
from diffprune.metrics import load_reference

setup(snakemake.log[0], threads=snakemake.threads)
faiss.omp_set_num_threads(snakemake.threads)
cfg = snakemake.params.cluster
features = load_reference(snakemake.input[0])["features"].astype(np.float32)
clustering = kmeans(
    features,
    k=cfg["k"],
    iterations=cfg["iterations"],
    seed=cfg["seed"],
    device="cpu",
    key="cluster.k (also the number of modes of mode_coverage)",
)
io.save_npy(snakemake.output[0], clustering.centroids)
