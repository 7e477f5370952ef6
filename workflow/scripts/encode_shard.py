"""Snakemake script for rule `encode_shard` (autoencoder.encode_shards > 1): the latents of one
contiguous slice of the training images, whole batches of encode_batch_size, for `encode_gather`."""

from pathlib import Path

from diffprune.autoencoder import write_latents
from diffprune.batches import resolve_num_workers
from diffprune.data import load_store
from diffprune.defaults import with_defaults
from diffprune.device import resolve_device
from diffprune.logs import setup
from diffprune.shards import shard_rows

setup(snakemake.log[0], threads=snakemake.threads)
cfg = with_defaults("autoencoder", snakemake.params.autoencoder)
store = load_store(Path(snakemake.input.images).parent)
device = resolve_device(cfg["device"], key="autoencoder.device")
rows = shard_rows(
    len(store.images), cfg["encode_shards"], int(snakemake.wildcards.shard),
    cfg["encode_batch_size"], key="autoencoder.encode_shards",
)  # fmt: skip
write_latents(
    snakemake.input.autoencoder,
    store.images,
    resolution=int(snakemake.params.resolution),
    out_path=snakemake.output.latents,
    meta_path=snakemake.output.meta,
    batch_size=cfg["encode_batch_size"],
    device=str(device),
    num_workers=resolve_num_workers(
        cfg["encode_num_workers"], device, key="autoencoder.encode_num_workers"
    ),
    images_file=snakemake.input.images,
    rows=rows,
)
