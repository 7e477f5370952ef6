"""Snakemake script for rule `train`: train a diffusion model on the kept subset."""

import numpy as np
import pandas as pd

from diffprune.data import load_store
from diffprune.logs import setup
from diffprune.train import train

setup(snakemake.log[0], threads=snakemake.threads)
store = load_store(snakemake.input.store[0].rsplit("/", 1)[0])
manifest = pd.read_parquet(snakemake.input.manifest, columns=["sample_id", "keep"])
kept = manifest.loc[manifest["keep"], "sample_id"].to_numpy()
train(
    images=np.asarray(store.images[kept]),
    cfg=dict(snakemake.params.train),
    seed=int(snakemake.wildcards.seed),
    out_dir=snakemake.output.model,
    checkpoint_dir=snakemake.params.checkpoints,
    log_dir=snakemake.output.log_dir,
)
