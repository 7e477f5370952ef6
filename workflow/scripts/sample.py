"""Snakemake script for rule `sample`: generate samples from the EMA weights.

params["sample"] goes to write_samples whole: num_samples, steps, batch_size, grid_size and
guidance_scale (classifier-free guidance of conditional models; 1 is off).
A failed run gets an empty samples array and a grid that reads FAILED (logged at ERROR).
"""

from diffprune.logs import setup
from diffprune.sample import write_samples

setup(snakemake.log[0], threads=snakemake.threads)
write_samples(
    snakemake.input.model,
    samples_path=snakemake.output.samples,
    grid_path=snakemake.output.grid,
    cfg=snakemake.params.sample,
    seed=int(snakemake.wildcards.seed),
    device=snakemake.params.device,
)
