"""Hugging Face sources: a hub id is pinned to a revision, a local copy has none."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from diffprune.config import validate_params
from diffprune.data.build import build_store
from diffprune.data.huggingface import integer_classes, load_huggingface
from diffprune.errors import ConfigError, DataError
from diffprune.io import load_json
from tests.workflow_helpers import REPO

datasets = pytest.importorskip("datasets")
huggingface_hub = pytest.importorskip("huggingface_hub")
HUB_ID = "someone/faces"


@pytest.fixture
def local_copy(tmp_path):
    """A dataset in the Hugging Face format, saved to disk: what the hub would serve."""
    pixels = np.random.default_rng(0).integers(0, 256, (6, 10, 10, 3), dtype=np.uint8)
    split = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p in pixels], "label": [0, 1, 0, 1, 0, 1]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
        ),
    )
    datasets.DatasetDict({"train": split}).save_to_disk(tmp_path / "hf")
    return tmp_path / "hf"


def _params(**data) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= {"source": "huggingface", **data}
    return copy.deepcopy(params)


def test_hub_id_without_a_revision_is_refused_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", pytest.fail)  # nothing may be fetched
    with pytest.raises(ConfigError, match=rf"data.hf_revision = null: the hub dataset '{HUB_ID}'"):
        build_store(
            tmp_path / "s", source="huggingface", split="train", hf_name=HUB_ID, image_size=8,
            progress=False,
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"params.yaml: data.hf_revision = null: .* pinned"):
        validate_params(_params(hf_name=HUB_ID, hf_revision=None))
    validate_params(_params(hf_name=HUB_ID, hf_revision="5e1d0f2"))


def test_revision_reaches_the_hub_and_the_store_records_it(tmp_path, monkeypatch, local_copy):
    """A tag is resolved to its commit, which is what is read and what the store records."""
    commit = "c0ffee" + "0" * 34
    calls = []

    def dataset_info(self, name, *, revision):  # the hub's answer for this tag
        assert (name, revision) == (HUB_ID, "v1.0")
        return SimpleNamespace(sha=commit)

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)

    def hub(name, *, split, revision):  # serves the local copy in place of the hub
        calls.append((name, split, revision))
        return datasets.load_from_disk(str(local_copy))[split]

    monkeypatch.setattr(datasets, "load_dataset", hub)
    build_store(
        tmp_path / "s", source="huggingface", split="train", hf_name=HUB_ID,
        hf_revision="v1.0", label_column="label", image_size=8, progress=False,
    )  # fmt: skip
    assert calls == [(HUB_ID, "train", commit)]
    meta = load_json(tmp_path / "s" / "store.json")
    assert meta["dataset"] == HUB_ID and meta["provenance"]["params"]["hf_revision"] == "v1.0"
    assert meta["provenance"]["hf_commit"] == commit
    assert meta["num_samples"] == 6 and meta["class_names"] == ["a", "b"]


def test_local_copy_needs_no_revision_and_ignores_one(local_copy, caplog):
    validate_params(_params(hf_name=str(local_copy), hf_revision=None))
    validate_params(_params(hf_name=str(local_copy), hf_revision="main"))  # a profile's
    load_huggingface(str(local_copy), "train", image_size=8, revision="main", progress=False)
    assert "data.hf_revision = 'main' is not used" in caplog.text


@pytest.fixture
def integer_labels(tmp_path):
    """A local copy whose label column is plain integers (no ClassLabel, no class names)."""
    pixels = np.random.default_rng(1).integers(0, 256, (6, 10, 10, 3), dtype=np.uint8)
    split = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(p) for p in pixels],
            "label": [0, 2, 1, 2, 0, 1],
            "weight": [0.5] * 6,
        }
    )
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / "ints")
    return tmp_path / "ints"


def test_an_integer_label_column_gives_num_classes_and_is_checked_at_plan_time(integer_labels):
    """It used to give class_names None: the conditional DiT then failed after the autoencoder
    with `labels must be in [0, num_classes=0)`."""
    name = str(integer_labels)
    meta = build_store(
        integer_labels.parent / "store", source="huggingface", split="train", hf_name=name,
        label_column="label", image_size=8, progress=False,
    )  # fmt: skip
    assert meta["class_names"] == ["0", "1", "2"]  # num_classes = max + 1 = 3, the train rule's
    labels = pd.read_parquet(integer_labels.parent / "store" / "index.parquet")["label"]
    assert labels.tolist() == [0, 2, 1, 2, 0, 1]
    conditional = _params(hf_name=name, hf_label_column="label")
    conditional["train"] |= {"model": "dit", "conditional": True}
    validate_params(conditional)
    for column, expected in [
        ("weight", r"hf_label_column = 'weight' is a float64 column .* allowed: a ClassLabel"),
        ("lable", r"data\.hf_label_column = 'lable': no such column .*columns: image, label, w"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            validate_params(_params(hf_name=name, hf_label_column=column))
    with pytest.raises(ConfigError, match=r"hf_label_column = null: train\.conditional = true"):
        conditional["data"]["hf_label_column"] = None
        validate_params(conditional)
    with pytest.raises(DataError, match=r"holds the label -1; allowed: 0\.\.K-1"):
        integer_classes([0, -1], "x")
    with pytest.raises(DataError, match=r"holds float values \(0\.5\)"):
        integer_classes([0, 0.5], "x")
