"""Rules of params.yaml's data section that cross keys or read the disk (config's checks).

The source's own keys (a folder, a dataset id, a pinned revision, sizes within Fashion-MNIST's
splits), an image folder that would read the workflow's own outputs, and a label column that
cannot give classes: each found before any job runs, one line per problem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffprune import paths

# Fashion-MNIST's splits and classes (data/fashion_mnist.py; checked against the files in tests).
FASHION_MNIST = {"train": 60_000, "test": 10_000, "classes": 10}
# Folders that Snakemake, DVC and dvclive write, besides the workflow's own (paths.written_folders).
ENGINE_FOLDERS = ("dvclive", ".snakemake", ".dvc")
# label column types of a local Hugging Face copy that give classes (data/huggingface.py)
HF_LABEL_DTYPES = (
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "string",
)  # fmt: skip


def source_problems(params: dict[str, Any]) -> list[str]:
    data, problems = params["data"], []
    if data["source"] == "imagefolder" and not data["path"]:
        problems.append("data.path = null: the imagefolder source needs the folder of images")
    if data["source"] == "huggingface" and not data.get("hf_name"):
        problems.append("data.hf_name = null: the huggingface source needs a dataset id")
    hub_id = data.get("hf_name") and not Path(data["hf_name"]).exists()
    if data["source"] == "huggingface" and hub_id and data.get("hf_revision") is None:
        # the same rule as data.huggingface.check_revision, without importing the readers
        problems.append(
            f"data.hf_revision = null: the hub dataset {data['hf_name']!r} must be pinned "
            "to a revision (a commit sha, tag or branch); null only for a local folder"
        )
    if data["source"] == "fashion-mnist":
        problems += [
            f"data.{split}_size = {data[f'{split}_size']}: must be <= {FASHION_MNIST[split]} "
            f"(fashion-mnist's {split} split), or null for all of it"
            for split in ("train", "test")
            if (data[f"{split}_size"] or 0) > FASHION_MNIST[split]
        ]
    return problems


def folder_problems(params: dict[str, Any]) -> list[str]:
    """An image folder must not overlap a folder the workflow writes: the store would take in
    the workflow's own plots, samples or logs and change on every run (it never settles)."""
    data = params["data"]
    if data["source"] != "imagefolder":
        return []
    folders = [*map(str, paths.written_folders()), *ENGINE_FOLDERS, params["report"]["dir"]]
    written = dict.fromkeys(folders)
    problems = []
    for key in ("path", "test_path"):
        folder = data[key] and Path(data[key]).resolve()
        overlap = [w for w in written if folder and _overlap(folder, Path(w).resolve())]
        if overlap:
            problems.append(
                f"data.{key} = {data[key]!r}: overlaps {overlap[0]}/, which this workflow writes, "
                "so the store would read its own outputs and never settle; allowed: a folder "
                f"neither inside nor holding {', '.join(written)}"
            )
    return problems


def _overlap(a: Path, b: Path) -> bool:
    return a.is_relative_to(b) or b.is_relative_to(a)


def train_images(data: dict[str, Any]) -> tuple[int, str] | None:
    """The number of training images and where it comes from, when the config tells."""
    if data["train_size"] is not None:
        return data["train_size"], "data.train_size"
    if data["source"] == "fashion-mnist":
        return FASHION_MNIST["train"], "all of fashion-mnist's train split: data.train_size = null"
    return None


def label_problems(params: dict[str, Any]) -> list[str]:
    """A Hugging Face label column that cannot give classes, found before any job runs: what a
    local copy's dataset_info.json says of it, and a conditional model without any labels."""
    data, problems = params["data"], []
    if data["source"] != "huggingface":
        return problems
    column = data.get("hf_label_column")
    if column is None and params["train"].get("conditional", False):
        problems.append(
            "data.hf_label_column = null: train.conditional = true needs class labels; allowed: "
            "the dataset's label column, or train.conditional: false"
        )
    if column is None or not data.get("hf_name"):
        return problems
    local = Path(data["hf_name"])  # a hub id names no folder: nothing to read before the job
    for info in sorted(local.glob("dataset_info.json")) + sorted(local.glob("*/dataset_info.json")):
        features = json.loads(info.read_text()).get("features") or {}
        kind = features.get(column)
        if kind is None:
            problems.append(
                f"data.hf_label_column = {column!r}: no such column in {info.parent} "
                f"(columns: {', '.join(features)})"
            )
        elif kind.get("_type") != "ClassLabel" and kind.get("dtype") not in HF_LABEL_DTYPES:
            problems.append(
                f"data.hf_label_column = {column!r} is a {kind.get('dtype', kind.get('_type'))} "
                f"column in {info.parent}; allowed: a ClassLabel, integer or string column"
            )
    return problems
