"""Snakemake script for rule `sample`: generate samples from the EMA weights."""

from diffprune import io
from diffprune.logs import setup
from diffprune.sample import generate, save_grid

setup(snakemake.log[0], threads=snakemake.threads)
cfg = snakemake.params.sample
images = generate(
    snakemake.input.model,
    num_samples=cfg["num_samples"],
    steps=cfg["steps"],
    batch_size=cfg["batch_size"],
    seed=int(snakemake.wildcards.seed),
    device=snakemake.params.device,
)
io.save_npy(snakemake.output.samples, images)
save_grid(images[: cfg["grid_size"] ** 2], snakemake.output.grid, nrow=cfg["grid_size"])
