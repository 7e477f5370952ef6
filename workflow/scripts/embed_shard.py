"""Snakemake script for rule `embed_shard` (embed.shards > 1): embed one contiguous slice of the
training images, whole batches of embed.batch_size, for rule `embed_gather`."""

from diffprune import io
from diffprune.data import load_store
from diffprune.embed_job import embed_rows
from diffprune.logs import setup
from diffprune.shards import shard_rows

setup(snakemake.log[0], threads=snakemake.threads)
cfg = snakemake.params.embed
store = load_store(snakemake.input[0].rsplit("/", 1)[0])
rows = shard_rows(
    len(store.images), cfg["shards"], int(snakemake.wildcards.shard), cfg["batch_size"],
    key="embed.shards",
)  # fmt: skip
meta = embed_rows(
    store.images, cfg, snakemake.output.embeddings, images_path=snakemake.input[0], rows=rows
)
io.save_json(snakemake.output.meta, meta)
