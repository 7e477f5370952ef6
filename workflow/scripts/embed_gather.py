"""Snakemake script for rule `embed_gather`: the shards' rows into the one embeddings file and
sidecar that rule `embed` writes with embed.shards = 1 (same `.npy` bytes)."""

from diffprune import io
from diffprune.logs import setup
from diffprune.shards import gather_meta, gather_npy

setup(snakemake.log[0])
gather_npy(snakemake.input.embeddings, snakemake.output.embeddings)
io.save_json(snakemake.output.meta, gather_meta([io.load_json(p) for p in snakemake.input.metas]))
