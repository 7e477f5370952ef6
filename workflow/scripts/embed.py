"""Snakemake script for rule `embed` (embed.shards = 1): embed every training image."""

from diffprune import io
from diffprune.data import load_store
from diffprune.embed_job import embed_rows
from diffprune.logs import setup

setup(snakemake.log[0], threads=snakemake.threads)
store = load_store(snakemake.input[0].rsplit("/", 1)[0])
meta = embed_rows(
    store.images,
    snakemake.params.embed,
    snakemake.output.embeddings,
    images_path=snakemake.input[0],
)
io.save_json(snakemake.output.meta, meta)
