"""Snakemake script for rule `download`: build the image store of one split."""

from pathlib import Path

from diffprune.data import build_store
from diffprune.data.build import MIN_SPLIT_IMAGES
from diffprune.data.fingerprint import DEFAULT_FINGERPRINT
from diffprune.logs import setup

setup(snakemake.log[0], threads=snakemake.threads)
data = snakemake.params.data
split = snakemake.wildcards.split
build_store(
    Path(snakemake.output.images).parent,
    source=data["source"],
    split=split,
    path=data["path"],
    test_path=data.get("test_path"),
    download=data["download"],
    size=data["train_size"] if split == "train" else data["test_size"],
    seed=data["seed"],
    image_size=data["image_size"],
    hf_name=data.get("hf_name"),
    hf_split=data.get("hf_test_split") if split == "test" else None,
    hf_revision=data.get("hf_revision"),
    label_column=data.get("hf_label_column"),
    test_fraction=data.get("test_fraction", 0.1),
    min_images=MIN_SPLIT_IMAGES,
    fingerprint=data.get("fingerprint", DEFAULT_FINGERPRINT),
)
