"""Snakemake script for rule `cluster`: k-means on the embeddings (diffprune.cluster)."""

import faiss
import numpy as np

from diffprune import io
from diffprune.cluster import clusters_frame, kmeans, machine
from diffprune.degenerate import degeneracy
from diffprune.logs import setup

setup(snakemake.log[0], threads=snakemake.threads)
faiss.omp_set_num_threads(snakemake.threads)
cfg = snakemake.params.cluster
# a memory map: with cluster.fit_size, only the fit sample and one chunk are ever in memory
embeddings = np.load(snakemake.input.embeddings, mmap_mode="r")
clustering = kmeans(
    embeddings,
    k=cfg["k"],
    iterations=cfg["iterations"],
    seed=cfg["seed"],
    init=cfg.get("init", "k-means++"),
    device=cfg.get("device", "auto"),
    key="cluster.k",
    fit_size=cfg.get("fit_size"),
    fit_key="cluster.fit_size",
)
clusters = clusters_frame(clustering)
io.save_parquet(snakemake.output.clusters, clusters)
io.save_npy(snakemake.output.centroids, clustering.centroids)
sizes = np.bincount(clustering.assignments, minlength=cfg["k"])
io.save_json(
    snakemake.output.meta,
    {
        "k": cfg["k"],
        "init": cfg.get("init", "k-means++"),
        # float64: the same clusters on any CPU; faiss-*: float32, may differ across machines
        "backend": clustering.backend,
        "iterations_run": clustering.iterations,
        # the centroids were fitted on these many points (a seeded sample unless all of them)
        "fit_points": clustering.fit_points,
        "fit_on_all_points": clustering.fit_points == len(clustering.assignments),
        "machine": machine(),
        "cluster_sizes": sizes.tolist(),
        # clusters whose ranking by distance decides nothing (ties go by sample id)
        "degenerate": degeneracy(clusters, cfg["k"]),
        "seconds": clustering.seconds,
        "fit_seconds": clustering.fit_seconds,  # the rest of `seconds` assigned every point
        "embedder": io.load_json(snakemake.input.embeddings_meta)["model"],
        "provenance": io.provenance(params=cfg, inputs={"embeddings": snakemake.input.embeddings}),
    },
)
