"""Snakemake script for rule `surrogate`: train the score methods' surrogate models."""

from diffprune.data import load_store
from diffprune.logs import setup
from diffprune.surrogate import train_moso_surrogates, train_surrogate

setup(snakemake.log[0], threads=snakemake.threads)
cfg = snakemake.params.scores
store = load_store(snakemake.input[0].rsplit("/", 1)[0])
images = store.images  # memory-mapped: training and loss records read the rows they use
common = {
    "seed": cfg["seed"],
    "out_dir": snakemake.output[0],
    "checkpoint_dir": snakemake.params.checkpoints,
}
if snakemake.wildcards.kind == "moso":
    train_moso_surrogates(
        images,
        num_subsets=cfg["moso_subsets"],
        cfg={**snakemake.params.train, "steps": cfg["moso_steps"]},
        num_snapshots=cfg["moso_snapshots"],
        **common,
    )
else:
    train_surrogate(
        images,
        cfg={**snakemake.params.train, "steps": cfg["steps"]},
        num_snapshots=cfg["num_snapshots"],
        record_losses=True,
        **common,
    )
