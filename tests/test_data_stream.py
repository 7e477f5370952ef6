"""Building a store holds one batch of images in memory, not the dataset, and resumes a crash."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffprune.data import decode
from diffprune.data.build import build_store
from diffprune.data.store import load_store

N, SIZE = 1500, 48  # 10 MB of decoded images; batches of 100 are 0.7 MB


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for i in range(N):
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:04d}.png", compress_level=0)
    (root / "9999_bad.png").write_bytes(b"not a png")
    return root


def _build(out: Path, folder: Path, **kwargs) -> dict:
    return build_store(
        out, source="imagefolder", split="train", path=folder, image_size=SIZE,
        test_fraction=0.1, progress=False, batch_size=100, **kwargs,
    )  # fmt: skip


def test_store_larger_than_memory_is_built_and_read_in_batches(tmp_path, folder):
    tracemalloc.start()
    try:
        meta = _build(tmp_path / "s", folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dataset = meta["num_samples"] * SIZE * SIZE * 3
    assert meta["num_samples"] == N - N // 10 and meta["bad_images"][0]["path"] == "9999_bad.png"
    assert peak < dataset / 2, f"peak {peak} bytes for a {dataset}-byte store"
    assert not list((tmp_path / "s").glob(".decoding-*"))  # the scratch is gone

    store = load_store(tmp_path / "s")
    assert isinstance(store.images, np.memmap)
    first = store.index["source"].iloc[0]
    np.testing.assert_array_equal(store.images[0], np.asarray(Image.open(folder / first)))
    total = sum(
        int(store.images[at : at + 256].sum(dtype=np.int64)) for at in range(0, len(store), 256)
    )
    assert total == int(np.asarray(store.images).sum(dtype=np.int64))


def test_crashed_build_resumes_where_it_stopped(tmp_path, folder, monkeypatch):
    _build(tmp_path / "whole", folder)
    real_fit, calls = decode.fit_image, []

    def crash_after(limit):
        def fit(*args, **kwargs):
            calls.append(1)
            if len(calls) > limit:
                raise KeyboardInterrupt  # the job is killed mid-way
            return real_fit(*args, **kwargs)

        return fit

    monkeypatch.setattr(decode, "fit_image", crash_after(700))
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "s", folder)
    assert not (tmp_path / "s" / "images.npy").exists()
    assert len(list((tmp_path / "s").glob(".decoding-*/images.npy"))) == 1

    calls.clear()
    monkeypatch.setattr(decode, "fit_image", crash_after(N))
    _build(tmp_path / "s", folder)
    assert len(calls) == N - 512  # progress was saved every 256 items, at 512 (all readable)
    for name in ("images.npy", "index.parquet"):
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not list((tmp_path / "s").glob(".decoding-*"))
