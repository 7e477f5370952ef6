"""Snakemake script for rule `autoencoder`: train or copy the latent autoencoder.

input: the train store's images.npy (first input); params: `autoencoder` (the params section),
`resolution` (train.resolution) and optionally `checkpoints` (resumable training state);
output: the autoencoder folder (first output).
"""

from pathlib import Path

from diffprune.autoencoder_train import prepare_autoencoder
from diffprune.data import load_store
from diffprune.logs import setup

setup(snakemake.log[0], threads=snakemake.threads)
store = load_store(Path(snakemake.input[0]).parent)
cfg = dict(snakemake.params.autoencoder)
prepare_autoencoder(
    cfg,
    images=store.images,
    resolution=int(snakemake.params.resolution),
    seed=int(cfg["seed"]),
    out_dir=snakemake.output[0],
    checkpoint_dir=snakemake.params.get("checkpoints"),
)
