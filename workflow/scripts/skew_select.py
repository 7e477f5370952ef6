"""Snakemake script for rule `skew_select`: the manifest of one arm of the fairness study."""

import numpy as np
import pandas as pd

from diffprune import io
from diffprune.logs import setup, stopwatch
from diffprune.names import Run
from diffprune.select import sidecar
from diffprune.skew import ARM_RULES, arm_ids, arm_manifest, skewed_ids

setup(snakemake.log[0])
cfg, arm = snakemake.params.skew, snakemake.wildcards.arm
seed = int(snakemake.wildcards.seed)
labels = pd.read_parquet(snakemake.input.index, columns=["label"])["label"].to_numpy()
with stopwatch() as timing:
    skewed = skewed_ids(
        labels,
        minority_classes=cfg["minority_classes"],
        minority_share=cfg["minority_share"],
        size=cfg["size"],
        seed=cfg["seed"],
    )
    kept, clusters = arm_ids(
        arm,
        skewed=skewed,
        labels=labels,
        embeddings=np.load(snakemake.input.embeddings),
        keep=cfg["keep"],
        k=cfg["k"],
        iterations=snakemake.params.cluster["iterations"],
        seed=seed,
    )
manifest = arm_manifest(len(labels), kept, clusters)
io.save_parquet(snakemake.output.manifest, manifest)
embedding = io.load_json(snakemake.input.embeddings_meta)
uses_embeddings = arm == "cluster-balanced"
io.save_json(
    snakemake.output.meta,
    sidecar(
        manifest,
        run=Run.skew(arm),
        seed=seed,
        **ARM_RULES[arm],
        compute={
            "select_seconds": timing["seconds"],
            "embeddings_seconds": embedding["seconds"] if uses_embeddings else 0.0,
        },
        k=cfg["k"] if uses_embeddings else None,
        embedder=embedding["model"] if uses_embeddings else None,
        skewed_size=len(skewed),
        provenance=io.provenance(
            params={"skew": dict(cfg), "arm": arm, "seed": seed},
            inputs={"index": snakemake.input.index, "embeddings": snakemake.input.embeddings},
        ),
    ),
)
