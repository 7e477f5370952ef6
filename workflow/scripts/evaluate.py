"""Snakemake script for rule `evaluate`: one flat metrics JSON per run and seed."""

from pathlib import Path

import numpy as np

from diffprune import io
from diffprune.evaluate import evaluate_samples
from diffprune.logs import setup

setup(snakemake.log[0], threads=snakemake.threads)
cfg = snakemake.params.evaluate
inputs = snakemake.input
selection = io.load_json(inputs.manifest_meta)
training = io.load_json(Path(inputs.model) / "train.json")
metrics = evaluate_samples(
    np.load(inputs.samples),
    references={Path(p).stem: p for p in inputs.references},
    resolution=snakemake.params.resolution,
    classifier_path=inputs.get("classifier"),
    image_size=cfg.get("image_size", 64),
    inception_weights=cfg.get("inception_weights"),
    batch_size=cfg.get("batch_size", 256),
    device=cfg.get("device", "auto"),
)
io.save_json(
    snakemake.output[0],
    {
        "run": selection["run"],
        "method": selection["method"],
        "ratio": selection["ratio"],
        "seed": selection["seed"],
        "n_total": selection["n_total"],
        "n_kept": selection["n_kept"],
        "kept_fraction": selection["kept_fraction"],
        "selection_seconds": selection["compute"]["total_seconds"],
        "train_seconds": training["wall_seconds"],
        "train_steps": training["steps"],
        **metrics,
    },
)
