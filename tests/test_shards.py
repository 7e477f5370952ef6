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


def gathered(tmp_path, name, shards, n, batch_size, key, job):
    """Run `job(rows, npy, json)` for every shard of `shards`, gather the `.npy` files into
    `name`.npy; returns the shard sidecars."""
    parts, metas = [], []
    for i in range(shards):
        rows = shard_rows(n, shards, i, batch_size, key=key)
        parts.append(tmp_path / f"{name}{i}.npy")
        metas.append(job(rows, parts[-1], tmp_path / f"{name}{i}.json"))
    gather_npy(parts, tmp_path / f"{name}.npy")
    return metas


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory):
    """A random-weight gray AutoencoderKL (8, 16 channels) made ready by the pretrained path."""
    import torch
    from diffusers import AutoencoderKL

    from diffprune.autoencoder_train import prepare_autoencoder

    root = tmp_path_factory.mktemp("ae")
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=1, out_channels=1, block_out_channels=(8, 16), latent_channels=2,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
    ).save_pretrained(root / "hub")  # fmt: skip
    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    cfg = {"source": "pretrained", "pretrained": str(root / "hub"), "device": "cpu"}
    prepare_autoencoder(cfg, images=images, resolution=16, seed=0, out_dir=root / "ae",
                        progress=False)  # fmt: skip
    return root / "ae"


@pytest.mark.parametrize("shards", [2, 3])
def test_gathered_encode_shards_are_the_latents_and_record_of_one_job(
    autoencoder_dir, tmp_path, shards
):
    from diffprune.autoencoder import write_latents

    images = np.random.default_rng(2).integers(0, 256, (37, 16, 16, 1), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    common = {
        "resolution": 16, "batch_size": 8, "device": "cpu", "progress": False,
        "images_file": tmp_path / "images.npy",
    }  # fmt: skip
    one = write_latents(autoencoder_dir, images, out_path=tmp_path / "one.npy",
                        meta_path=tmp_path / "one.json", **common)  # fmt: skip

    def job(rows, npy, meta):
        return write_latents(autoencoder_dir, images, out_path=npy, meta_path=meta, rows=rows,
                             **common)  # fmt: skip

    metas = gathered(tmp_path, "all", shards, 37, 8, "autoencoder.encode_shards", job)
    assert (tmp_path / "all.npy").read_bytes() == (tmp_path / "one.npy").read_bytes()
    gathered_meta = gather_meta(metas)
    assert list(gathered_meta) == list(one) and gathered_meta["shape"] == [37, 2, 8, 8]
    assert {**gathered_meta, "seconds": 0} == {**one, "seconds": 0}


@pytest.fixture(scope="module")
def surrogate_dir(tmp_path_factory):
    """A tiny surrogate trained 2 steps on 21 random 8 px gray images (with its EMA snapshot)."""
    from diffprune.surrogate import train_surrogate
    from tests.conftest import TINY_UNET

    root = tmp_path_factory.mktemp("sur")
    images = np.random.default_rng(4).integers(0, 256, (21, 8, 8, 1), dtype=np.uint8)
    train_surrogate(
        images, cfg={**TINY_UNET, "steps": 2}, seed=0, out_dir=root / "sur",
        checkpoint_dir=root / "ckpt", num_snapshots=1, record_losses=False, progress=False,
    )  # fmt: skip
    return root / "sur", images


@pytest.mark.parametrize(("name", "shards"), [("el2n", 3), ("grand", 2)])
def test_gathered_score_shards_are_the_scores_and_record_of_one_job(
    surrogate_dir, tmp_path, name, shards
):
    """Each row keeps its sample id's draw (two el2n draws, the random t) and its batch."""
    from diffprune.scores import compute_scores, gather_info

    folder, images = surrogate_dir
    cfg = {"el2n_draws": 2, "timestep": None, "shards": shards}
    common = {"surrogate_dir": folder, "images": images, "seed": 5, "batch_size": 4,
              "device": "cpu", "progress": False}  # fmt: skip
    one, one_info = compute_scores(name, cfg={**cfg, "shards": 1}, **common)
    np.save(tmp_path / "one.npy", one)

    def job(rows, npy, _):
        scores, info = compute_scores(name, cfg=cfg, rows=rows, **common)
        np.save(npy, scores)
        return info

    infos = gathered(tmp_path, "all", shards, 21, 4, "scores.shards", job)
    assert (tmp_path / "all.npy").read_bytes() == (tmp_path / "one.npy").read_bytes()
    info = gather_info(infos)
    assert list(info) == list(one_info) and info["n"] == 21 and "shards" not in info["params"]
    timing = {"seconds": 0, "scoring_seconds": 0, "gpu_seconds": 0}
    assert {**info, **timing} == {**one_info, **timing}
    assert info["seconds"] == pytest.approx(info["surrogate_seconds"] + info["scoring_seconds"])


def test_only_row_scores_are_sharded(surrogate_dir):
    from diffprune.scores import compute_scores

    folder, images = surrogate_dir
    with pytest.raises(ValueError, match="forgetting scores are not sharded; only el2n, grand"):
        compute_scores("forgetting", surrogate_dir=folder, images=images, rows=range(0, 4))
