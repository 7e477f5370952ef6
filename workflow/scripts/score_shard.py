"""Snakemake script for rule `score_shard` (scores.shards > 1, el2n and grand): the scores of one
contiguous slice of the training images, whole batches of scores.batch_size, for `score_gather`."""

from diffprune import io
from diffprune.data import load_store
from diffprune.logs import setup
from diffprune.scores import compute_scores
from diffprune.shards import shard_rows

setup(snakemake.log[0], threads=snakemake.threads)
cfg = snakemake.params.scores
store = load_store(snakemake.input.store[0].rsplit("/", 1)[0])
rows = shard_rows(
    len(store.images), cfg["shards"], int(snakemake.wildcards.shard), cfg["batch_size"],
    key="scores.shards",
)  # fmt: skip
scores, info = compute_scores(
    snakemake.wildcards.score,
    surrogate_dir=snakemake.input.surrogate,
    images=store.images,
    cfg=cfg,
    seed=cfg["seed"],
    batch_size=cfg["batch_size"],
    device=cfg["device"],
    rows=rows,
)
io.save_npy(snakemake.output.scores, scores)
io.save_json(snakemake.output.meta, info)
