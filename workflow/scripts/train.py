"""Snakemake script for rule `train`: train a diffusion model on the kept subset.

Training gets the memory-mapped store (or cached latents) and the kept rows' ids, never a copy
of the kept subset: it reads the rows it needs (diffprune.train_data; train.data_on_device). A
class-conditional model (train.conditional) gets the kept rows' labels and the store's number of
classes. In latent space (train.space: latent) it trains on the kept rows' cached latents, which
it scales by the autoencoder's measured factor, and records how to decode them.

A diverged run is written as a failed model folder (diffprune.status), so the rest of the grid
goes on and the report shows the failure; the last good checkpoint stays for a look. Like every
job, it stops itself when the Snakemake process that started it dies (diffprune.logs.setup):
a killed Snakemake leaves no training behind that a rerun would run beside.

With train.num_processes N > 1 this file runs itself again through `accelerate launch` on N
processes (diffprune.launch) and waits for them; the main one writes the outputs.
"""

import logging
import sys
from pathlib import Path

from diffprune.autoencoder import autoencoder_info, load_latents
from diffprune.data import load_store
from diffprune.errors import TrainingDiverged
from diffprune.launch import is_main, launched, relaunch
from diffprune.logs import setup
from diffprune.manifest import read_manifest
from diffprune.status import write_failed_model
from diffprune.train import train

setup(snakemake.log[0], threads=snakemake.threads)
cfg, seed = dict(snakemake.params.train), int(snakemake.wildcards.seed)
processes = cfg.get("num_processes", 1)
if processes > 1 and not launched():
    # sys.argv[0]: the file Snakemake runs, with the job in it (__file__ names the original)
    relaunch(sys.argv[0], num_processes=processes, threads=snakemake.threads)
    sys.exit(0)
store = load_store(snakemake.input.store[0].rsplit("/", 1)[0])
manifest = read_manifest(snakemake.input.manifest)
kept = manifest.loc[manifest["keep"], "sample_id"].to_numpy()
conditional = cfg.get("conditional", False)
if cfg.get("space", "pixel") == "pixel":
    data = {"images": store.images}
else:
    latents, meta = load_latents(snakemake.input.latents, snakemake.input.latents_meta)
    info = autoencoder_info(meta["autoencoder"])
    data = {
        "latents": latents,
        "latent": {
            "autoencoder": meta["autoencoder"],
            "scale_factor": meta["scale_factor"],
            "image_channels": info["image_channels"],
        },
    }
try:
    train(
        **data,
        rows=kept,
        labels=store.index["label"].to_numpy()[kept] if conditional else None,
        num_classes=len(store.meta["class_names"] or []) if conditional else None,
        cfg=cfg,
        seed=seed,
        out_dir=snakemake.output.model,
        checkpoint_dir=snakemake.params.checkpoints,
        log_dir=snakemake.output.log_dir,
    )
except TrainingDiverged as err:
    logging.getLogger("train").error(
        "run %s seed %d failed: %s", snakemake.wildcards.run, seed, err
    )
    if is_main():  # every process raises it; one writes the record
        write_failed_model(
            snakemake.output.model, reason=str(err), cfg=cfg, seed=seed, step=err.step
        )
Path(snakemake.output.log_dir).mkdir(parents=True, exist_ok=True)  # empty if training failed early
