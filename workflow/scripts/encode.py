"""Snakemake script for rule `encode`: cache the latents of every training image.

inputs: `autoencoder` (the folder) and `images` (the train store's images.npy); params:
`autoencoder` (the params section) and `resolution` (train.resolution); outputs: `latents`
(latents.npy) and `meta` (latents.json).
"""

from pathlib import Path

from diffprune.autoencoder import write_latents
from diffprune.batches import resolve_num_workers
from diffprune.data import load_store
from diffprune.device import resolve_device
from diffprune.logs import setup

setup(snakemake.log[0], threads=snakemake.threads)
cfg = snakemake.params.autoencoder
store = load_store(Path(snakemake.input.images).parent)
device = resolve_device(cfg.get("device", "auto"), key="autoencoder.device")
write_latents(
    snakemake.input.autoencoder,
    store.images,
    resolution=int(snakemake.params.resolution),
    out_path=snakemake.output.latents,
    meta_path=snakemake.output.meta,
    batch_size=cfg.get("encode_batch_size", 256),
    device=str(device),
    num_workers=resolve_num_workers(
        cfg.get("encode_num_workers", "auto"), device, key="autoencoder.encode_num_workers"
    ),
    images_file=snakemake.input.images,
)
