"""Snakemake script for rule `encode_gather`: the shards' rows into the one latents file and
record that rule `encode` writes with autoencoder.encode_shards = 1 (same `.npy` bytes)."""

from diffprune import io
from diffprune.logs import setup
from diffprune.shards import gather_meta, gather_npy

setup(snakemake.log[0])
gather_npy(snakemake.input.latents, snakemake.output.latents)
io.save_json(snakemake.output.meta, gather_meta([io.load_json(p) for p in snakemake.input.metas]))
