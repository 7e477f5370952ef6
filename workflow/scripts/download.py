"""Snakemake script for rule `download`: build the image store of one split."""

from pathlib import Path

from diffprune.data import build_store
from diffprune.logs import setup

setup(snakemake.log[0], threads=snakemake.threads)
data = snakemake.params.data
split = snakemake.wildcards.split
path = data["path"]
if split == "test" and data.get("test_path"):
    path = data["test_path"]
build_store(
    Path(snakemake.output.images).parent,
    source=data["source"],
    split=split,
    path=path,
    download=data["download"],
    size=data["train_size"] if split == "train" else data["test_size"],
    seed=data["seed"],
    image_size=data["image_size"],
    hf_name=data.get("hf_name"),
    test_fraction=data.get("test_fraction", 0.1),
)
