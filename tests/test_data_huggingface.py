"""Hugging Face sources: a hub id is pinned to a revision, a local copy has none."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml
from PIL import Image

from diffprune.config import validate_params
from diffprune.data.build import build_store
from diffprune.data.huggingface import load_huggingface
from diffprune.errors import ConfigError
from diffprune.io import load_json
from tests.workflow_helpers import REPO

datasets = pytest.importorskip("datasets")
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
    calls = []

    def hub(name, *, split, revision):  # serves the local copy in place of the hub
        calls.append((name, split, revision))
        return datasets.load_from_disk(str(local_copy))[split]

    monkeypatch.setattr(datasets, "load_dataset", hub)
    build_store(
        tmp_path / "s", source="huggingface", split="train", hf_name=HUB_ID,
        hf_revision="5e1d0f2", label_column="label", image_size=8, progress=False,
    )  # fmt: skip
    assert calls == [(HUB_ID, "train", "5e1d0f2")]
    meta = load_json(tmp_path / "s" / "store.json")
    assert meta["dataset"] == HUB_ID and meta["provenance"]["params"]["hf_revision"] == "5e1d0f2"
    assert meta["num_samples"] == 6 and meta["class_names"] == ["a", "b"]


def test_local_copy_has_no_revision(local_copy):
    with pytest.raises(ConfigError, match=r"data\.hf_revision = '5e1d0f2': only a hub id"):
        load_huggingface(str(local_copy), "train", image_size=8, revision="5e1d0f2")
    with pytest.raises(ConfigError, match=r"hf_revision = '5e1d0f2': data\.hf_name is a local"):
        validate_params(_params(hf_name=str(local_copy), hf_revision="5e1d0f2"))
    validate_params(_params(hf_name=str(local_copy), hf_revision=None))
