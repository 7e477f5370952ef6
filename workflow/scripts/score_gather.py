"""Snakemake script for rule `score_gather`: the shards' rows into the one scores file and record
that rule `score` writes with scores.shards = 1 (same `.npy` bytes)."""

from diffprune import io
from diffprune.logs import setup
from diffprune.scores import gather_info
from diffprune.shards import gather_npy

setup(snakemake.log[0])
gather_npy(snakemake.input.scores, snakemake.output.scores)
io.save_json(snakemake.output.meta, gather_info([io.load_json(p) for p in snakemake.input.metas]))
