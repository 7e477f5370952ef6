"""Sharded embedding: N jobs over slices of the store, gathered into the bytes of one job."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from diffprune import io
from diffprune.data.store import load_store, write_store
from diffprune.embed_job import embed_rows
from diffprune.errors import ConfigError
from diffprune.shards import gather_meta, gather_npy, shard_rows

CFG = {
    "model": "efficientnet-lite0", "weights": None, "image_size": 32, "batch_size": 16,
    "device": "cpu", "num_workers": 0,
}  # fmt: skip


def test_shards_are_contiguous_whole_batches_covering_every_row():
    for n, shards, batch in [(70, 3, 16), (64, 4, 16), (5, 1, 16), (1000, 7, 10)]:
        parts = [shard_rows(n, shards, i, batch, key="embed.shards") for i in range(shards)]
        assert [r for p in parts for r in p] == list(range(n))
        assert all(p.start % batch == 0 and len(p) > 0 for p in parts)


def test_more_shards_than_batches_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^embed.shards = 6: more shards than batches \(5 of"):
        shard_rows(70, 6, 0, 16, key="embed.shards")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """70 random images (16 px RGB, 5 batches of 16, the last partial), memory-mapped."""
    root = tmp_path_factory.mktemp("store")
    images = np.random.default_rng(3).integers(0, 256, (70, 16, 16, 3), dtype=np.uint8)
    index = pd.DataFrame({"sample_id": np.arange(70), "source": "test"})
    write_store(root, [images], images.shape, index, {"source": "test"})
    return root


@pytest.mark.parametrize("shards", [2, 3])
def test_gathered_shards_are_the_bytes_and_sidecar_of_one_job(store, tmp_path, shards):
    images, path = load_store(store).images, store / "images.npy"
    one = embed_rows(images, CFG, tmp_path / "one.npy", images_path=path)
    cfg = {**CFG, "shards": shards}
    parts, metas = [], []
    for i in range(shards):
        parts.append(tmp_path / f"{i}.npy")
        rows = shard_rows(len(images), shards, i, cfg["batch_size"], key="embed.shards")
        metas.append(embed_rows(images, cfg, parts[-1], images_path=path, rows=rows))
    assert gather_npy(parts, tmp_path / "all.npy") == (70, 1280)
    assert (tmp_path / "all.npy").read_bytes() == (tmp_path / "one.npy").read_bytes()
    gathered = gather_meta(metas)
    assert list(gathered) == list(one)  # the same keys in the same order; only timing differs
    assert {**gathered, "seconds": 0} == {**one, "seconds": 0}
    io.save_json(tmp_path / "m.json", gathered)
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 70


def test_gather_refuses_shards_of_other_settings_or_missing_rows():
    meta = {"name": "e", "n": 16, "seconds": 1.0, "provenance": {"params": {"batch_size": 16}}}
    other = {**meta, "provenance": {"params": {"batch_size": 32}}}
    with pytest.raises(ValueError, match="different settings"):
        gather_meta([{**meta, "rows": [0, 16]}, {**other, "rows": [16, 32]}])
    with pytest.raises(ValueError, match="not contiguous"):
        gather_meta([{**meta, "rows": [0, 16]}, {**meta, "rows": [32, 48]}])
