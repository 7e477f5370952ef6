"""Snakemake script for rule `score`: per-sample scores from the surrogate(s).

The store stays memory-mapped: el2n and grand read it batch by batch (scores.num_workers)."""

from diffprune import io
from diffprune.data import load_store
from diffprune.logs import setup
from diffprune.scores import compute_scores

setup(snakemake.log[0], threads=snakemake.threads)
cfg = snakemake.params.scores
store = load_store(snakemake.input.store[0].rsplit("/", 1)[0])
scores, info = compute_scores(
    snakemake.wildcards.score,
    surrogate_dir=snakemake.input.surrogate,
    images=store.images,
    cfg=cfg,
    seed=cfg["seed"],
    batch_size=cfg["batch_size"],
    device=cfg["device"],
)
io.save_npy(snakemake.output.scores, scores)
io.save_json(snakemake.output.meta, info)
