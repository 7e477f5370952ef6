"""Snakemake script for rule `select`: write one run's prune manifest and its sidecar."""

import numpy as np
import pandas as pd

from diffprune import io
from diffprune.defaults import with_defaults
from diffprune.logs import setup, stopwatch
from diffprune.names import FULL, SEMDEDUP, Run
from diffprune.select import full_manifest, rule, select, semdedup_record, sidecar

setup(snakemake.log[0])
run, seed = Run.parse(snakemake.wildcards.run), int(snakemake.wildcards.seed)
inputs = snakemake.input
n = len(pd.read_parquet(inputs.index, columns=["sample_id"]))
clusters = pd.read_parquet(inputs.clusters) if inputs.get("clusters") else None
scores = np.load(inputs.scores) if inputs.get("scores") else None
embeddings = np.load(inputs.embeddings, mmap_mode="r") if inputs.get("embeddings") else None

params = with_defaults("select", snakemake.params.select)
order, eps = params["balanced_order"], params["semdedup_eps"]
with stopwatch() as timing:
    if run.method == FULL:
        manifest = full_manifest(n)
    else:
        manifest = select(
            run.method,
            run.ratio,
            n=n,
            clusters=clusters,
            scores=scores,
            seed=seed,
            balanced_order=order,
            embeddings=embeddings,
            semdedup_eps=eps,
        )
extra = semdedup_record(manifest, run.ratio, eps) if run.method == SEMDEDUP else {}

# The compute a selection cost includes the upstream stages it needed (the paper's cost argument).
compute = {"select_seconds": timing["seconds"]}
for name in ("embeddings_meta", "clusters_meta", "scores_meta"):
    if inputs.get(name):
        compute[name.replace("_meta", "_seconds")] = io.load_json(inputs.get(name))["seconds"]

io.save_parquet(snakemake.output.manifest, manifest)
io.save_json(
    snakemake.output.meta,
    sidecar(
        manifest,
        run=run,
        seed=seed,
        **rule(run.method, balanced_order=order),
        compute=compute,
        k=snakemake.params.cluster["k"] if clusters is not None else None,
        embedder=io.load_json(inputs.embeddings_meta)["model"] if clusters is not None else None,
        **extra,
        provenance=io.provenance(
            params={"select": dict(snakemake.params.select), "run": run.name, "seed": seed},
            inputs={k: v for k, v in inputs.items() if isinstance(v, str)},
        ),
    ),
)
