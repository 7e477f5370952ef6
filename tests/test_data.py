"""Image stores: IDX reading and verification, downloads (served locally), folders, scaling."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import sys
import tracemalloc
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from diffprune import metrics
from diffprune.data import (
    build,
    fashion_mnist,
    fingerprint,
    huggingface,
    image_folder,
    tensors,
)
from diffprune.data.store import load_store
from diffprune.errors import ConfigError, DataError
from diffprune.io import load_json

DEBIAN = fashion_mnist.DEBIAN_FASHION_MNIST
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist",
)
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")


# --------------------------------------------------------------------------------------- IDX
def test_read_idx_raw_and_gzip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(array))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "a"), array)
    np.testing.assert_array_equal(fashion_mnist.read_idx(tmp_path / "a.gz"), array)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "magic").write_bytes(b"\x12\x34\x08\x01" + b"\0" * 8)
    with pytest.raises(DataError, match="not an IDX file"):
        fashion_mnist.read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((4, 2), np.uint8))[:-1])
    with pytest.raises(DataError, match="IDX header says"):
        fashion_mnist.read_idx(tmp_path / "short")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b but not gzip")
    with pytest.raises(DataError, match="cannot read"):
        fashion_mnist.read_idx(tmp_path / "bad.gz")


# ----------------------------------------------------------------------------- Fashion-MNIST
def _tiny_fashion_mnist(folder: Path, monkeypatch) -> tuple[np.ndarray, bytes]:
    """Gzipped train IDX files of three 28x28 images whose pixel at (r, c) is (r * 28 + c + i) %
    256, not symmetric; the expected hashes are patched to these files' (no Debian package needed).
    Returns the images and the raw image bytes after the header."""
    rows, cols = np.mgrid[:28, :28]
    images = np.stack([(rows * 28 + cols + i) % 256 for i in range(3)]).astype(np.uint8)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    folder.mkdir()
    for stem, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        raw = _idx_bytes(array)
        (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        sha = hashlib.sha256(raw).hexdigest()
        monkeypatch.setitem(fashion_mnist.FASHION_MNIST_FILES[stem], "sha256", sha)
        monkeypatch.setitem(fashion_mnist.FASHION_MNIST_SHAPES, stem, array.shape)
    return images, _idx_bytes(images)[16:]


def test_fashion_mnist_images_are_read_row_major(tmp_path, monkeypatch, no_debian):
    expected, payload = _tiny_fashion_mnist(tmp_path / "fm", monkeypatch)
    images, labels, _ = fashion_mnist.load_fashion_mnist(
        "train", path=tmp_path / "fm", download=False
    )
    assert images.shape == (3, 28, 28, 1)
    for i, r, c in [(0, 0, 1), (0, 1, 0), (1, 2, 27), (2, 27, 2)]:
        assert images[i, r, c, 0] == payload[i * 28 * 28 + r * 28 + c]  # row r, column c
    np.testing.assert_array_equal(images[..., 0], expected)
    np.testing.assert_array_equal(labels, [3, 1, 4])

    build.build_store(
        tmp_path / "store", source="fashion-mnist", split="train", path=tmp_path / "fm",
        download=False, image_size=28, progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(load_store(tmp_path / "store").images[..., 0], expected)


@needs_debian
def test_load_fashion_mnist_debian():
    images, labels, sources = fashion_mnist.load_fashion_mnist("test", download=False)
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels[:5], [9, 2, 1, 1, 6])  # published first test labels
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
    assert sources[0] == "t10k-images-idx3-ubyte:0" and sources[-1].endswith(":9999")
    assert (
        len(fashion_mnist.FASHION_MNIST_CLASSES) == 10
        and fashion_mnist.FASHION_MNIST_CLASSES[9] == "Ankle boot"
    )


@needs_debian
def test_download_serves_official_urls_into_cache(monkeypatch, tmp_path, no_debian):
    requested = []
    for stem in TEST_FILES:  # Debian's files stand in for the official ones: their md5, same IDX
        md5 = hashlib.md5((DEBIAN / f"{stem}.gz").read_bytes()).hexdigest()
        monkeypatch.setitem(fashion_mnist.FASHION_MNIST_FILES[stem], "md5", md5)

    def fake_urlopen(url, timeout=None):
        requested.append(url)
        return open(DEBIAN / url.rsplit("/", 1)[1], "rb")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    cache = tmp_path / "raw"
    images, labels, _ = fashion_mnist.load_fashion_mnist("test", cache_dir=cache)
    assert requested == [fashion_mnist.FASHION_MNIST_FILES[s]["url"] for s in TEST_FILES]
    assert requested[0] == (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz"
    )
    assert sorted(p.name for p in cache.iterdir()) == [f"{s}.gz" for s in TEST_FILES]
    np.testing.assert_array_equal(
        images[:, :, :, 0], fashion_mnist.read_idx(DEBIAN / f"{TEST_FILES[0]}.gz")
    )

    # the cache is found before any download is tried
    monkeypatch.setattr(urllib.request, "urlopen", pytest.fail)
    again, again_labels, _ = fashion_mnist.load_fashion_mnist(
        "test", download=False, cache_dir=cache
    )
    np.testing.assert_array_equal(again, images)
    np.testing.assert_array_equal(again_labels, labels)


def test_download_with_wrong_content_leaves_nothing(monkeypatch, tmp_path, no_debian):
    fake = gzip.compress(_idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(fake))
    cache = tmp_path / "raw"
    with pytest.raises(DataError) as err:
        fashion_mnist.load_fashion_mnist("test", cache_dir=cache)
    message = str(err.value)
    assert fashion_mnist.FASHION_MNIST_FILES[TEST_FILES[0]]["url"] in message
    assert fashion_mnist.FASHION_MNIST_FILES[TEST_FILES[0]]["md5"] in message
    assert hashlib.md5(fake).hexdigest() in message
    assert list(cache.iterdir()) == []  # no partial or unverified file


def _gzip_bomb(header_shape: tuple[int, ...], payload_bytes: int) -> bytes:
    """A valid IDX header followed by far more zeros than it declares, gzipped (about 1000:1)."""
    header = bytes([0, 0, 0x08, len(header_shape)]) + np.array(header_shape, ">u4").tobytes()
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip container
    zeros = bytes(1 << 20)
    parts = [compressor.compress(header)]
    parts += [compressor.compress(zeros) for _ in range(payload_bytes >> 20)]
    return b"".join([*parts, compressor.flush()])


def test_download_is_checked_before_it_is_decompressed(monkeypatch, tmp_path, no_debian):
    bomb = _gzip_bomb((10_000, 28, 28), 64 << 20)  # 64 MB behind 64 KB
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(bomb))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="md5 of the download") as err:
            fashion_mnist.load_fashion_mnist("test", cache_dir=tmp_path / "raw")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fashion_mnist.FASHION_MNIST_FILES[TEST_FILES[0]]["url"] in str(err.value)
    assert peak < 16 << 20, f"peak {peak} bytes: the download was decompressed"
    assert list((tmp_path / "raw").iterdir()) == []


def test_gzip_bomb_is_read_no_further_than_its_known_shape(tmp_path, no_debian):
    """A local copy is decompressed within Fashion-MNIST's known sizes, whatever it holds."""
    (tmp_path / f"{TEST_FILES[0]}.gz").write_bytes(gzip.compress(b""))
    (tmp_path / f"{TEST_FILES[1]}.gz").write_bytes(_gzip_bomb((10_000,), 64 << 20))
    files = {"labels": tmp_path / f"{TEST_FILES[1]}.gz"}
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="more than the 10008 bytes") as err:
            fashion_mnist.read_fashion_mnist(files, "test")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(files["labels"]) in str(err.value)
    assert peak < 8 << 20, f"peak {peak} bytes: the bomb was decompressed"

    (tmp_path / "big").write_bytes(gzip.compress(_idx_bytes(np.zeros((5, 28, 28), np.uint8))))
    with pytest.raises(DataError, match=r"shape \(5, 28, 28\), expected \(10000, 28, 28\)"):
        fashion_mnist.read_idx(tmp_path / "big", shape=(10_000, 28, 28))


def test_bit_flipped_gzip_names_the_file(tmp_path):
    rng = np.random.default_rng(0)
    compressed = gzip.compress(_idx_bytes(rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    for position in range(10, len(compressed), max(1, len(compressed) // 200)):
        flipped = bytearray(compressed)
        flipped[position] ^= 1 << (position % 8)
        path.write_bytes(bytes(flipped))
        with pytest.raises(DataError, match=r"cannot read .*train-images-idx3-ubyte\.gz: corrupt"):
            fashion_mnist.read_idx(path)


def test_download_network_error_is_a_data_error(monkeypatch, tmp_path, no_debian):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load_fashion_mnist("train", cache_dir=tmp_path / "raw")


def test_nothing_found_without_download(tmp_path, no_debian):
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist, or set data.path"):
        fashion_mnist.load_fashion_mnist(
            "test", path=tmp_path, download=False, cache_dir=tmp_path / "c"
        )
    with pytest.raises(ConfigError, match="allowed"):
        fashion_mnist.load_fashion_mnist("valid", path=tmp_path, download=False)


@needs_debian
def test_corrupted_local_copy_names_file_and_hashes(tmp_path):
    shutil.copy(DEBIAN / f"{TEST_FILES[0]}.gz", tmp_path)
    raw = bytearray(gzip.decompress((DEBIAN / f"{TEST_FILES[1]}.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # still a valid IDX file, one label changed
    (tmp_path / f"{TEST_FILES[1]}.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError) as err:
        fashion_mnist.load_fashion_mnist("test", path=tmp_path, download=False)
    message = str(err.value)
    assert f"{TEST_FILES[1]}.gz" in message
    assert fashion_mnist.FASHION_MNIST_FILES[TEST_FILES[1]]["sha256"] in message
    assert hashlib.sha256(bytes(raw)).hexdigest() in message


@needs_debian
def test_build_store_subset_is_seeded_ordered_and_byte_identical(tmp_path):
    kwargs = dict(source="fashion-mnist", split="test", size=300, seed=3, download=False)
    meta = build.build_store(tmp_path / "a", **kwargs, progress=False)
    build.build_store(tmp_path / "b", **kwargs, progress=False)
    for name in ("images.npy", "index.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    store = load_store(tmp_path / "a")
    assert isinstance(store.images, np.memmap) and not store.images.flags.writeable
    assert store.images.shape == (300, 28, 28, 1) and meta["shape"] == [300, 28, 28, 1]
    index = store.index
    assert list(index.columns) == ["sample_id", "label", "source"]
    assert index["sample_id"].dtype == np.int64 and index["label"].dtype == np.int64
    np.testing.assert_array_equal(index["sample_id"], np.arange(300))
    rows = np.array([int(s.rsplit(":", 1)[1]) for s in index["source"]])
    assert (np.diff(rows) > 0).all()  # source order kept
    expected = np.sort(np.random.default_rng(3).choice(10000, size=300, replace=False))
    np.testing.assert_array_equal(rows, expected)
    full, labels, _ = fashion_mnist.load_fashion_mnist("test", download=False)
    np.testing.assert_array_equal(store.images, full[rows])
    np.testing.assert_array_equal(index["label"], labels[rows])
    assert store.meta["class_names"] == fashion_mnist.FASHION_MNIST_CLASSES
    assert set(store.meta["provenance"]["inputs"]) == {"images", "labels"}

    other = build.build_store(tmp_path / "c", **{**kwargs, "seed": 4}, progress=False)
    assert other["shape"] == meta["shape"]
    assert not load_store(tmp_path / "c").index["source"].equals(index["source"])


@needs_debian
def test_build_store_resizes_and_converts_channels(tmp_path):
    build.build_store(
        tmp_path, source="fashion-mnist", split="test", size=5, image_size=16, channels=3,
        download=False, progress=False,
    )  # fmt: skip
    store = load_store(tmp_path)
    assert store.images.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(store.images[..., 0], store.images[..., 2])


def test_build_store_rejects_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="allowed"):
        build.build_store(tmp_path, source="mnist", split="train")
    with pytest.raises(ConfigError, match="allowed"):
        build.build_store(tmp_path, source="fashion-mnist", split="val")
    with pytest.raises(ConfigError, match="channels"):
        build.build_store(tmp_path, source="imagefolder", split="train", path=tmp_path, channels=2)
    with pytest.raises(ConfigError, match="size"):
        build.subset_indices(10, size=11, seed=0)
    with pytest.raises(ConfigError, match=r"test_fraction = 0.1 of the 1 .*\(data\.test_path"):
        build.holdout_mask(1, test_fraction=0.1, seed=0)
    with pytest.raises(ConfigError, match=r"data\.test_fraction = 1.0; allowed: 0 <"):
        build.holdout_mask(5, test_fraction=1.0, seed=0)
    (tmp_path / "one").mkdir()
    (tmp_path / "held").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "one" / "only.png")
    with pytest.raises(ConfigError, match=r"data\.train_size = 5, but 1 images .* null for all"):
        build.build_store(
            tmp_path / "out", source="imagefolder", split="train", path=tmp_path / "one", size=5,
            test_path=tmp_path / "held", image_size=4, progress=False,
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"overlaps data\.path = .* two folders apart"):
        build.build_store(
            tmp_path / "out", source="imagefolder", split="train", path=tmp_path,
            test_path=tmp_path / "one", image_size=4, progress=False,
        )  # fmt: skip
    with pytest.raises(DataError, match="missing"):
        load_store(tmp_path / "nothing")


# ------------------------------------------------------------------------------- imagefolder
def _bands(width: int, height: int, colours) -> Image.Image:
    """Vertical bands of equal width, one per colour."""
    array = np.zeros((height, width, 3), np.uint8)
    step = width // len(colours)
    for i, colour in enumerate(colours):
        array[:, i * step : (i + 1) * step] = colour
    return Image.fromarray(array)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    (root / "cats" / "nested").mkdir(parents=True)
    (root / "dogs").mkdir()
    _bands(60, 10, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]).save(root / "cats" / "wide.png")
    Image.new("RGB", (12, 12), (10, 20, 30)).save(
        root / "cats" / "nested" / "flat.jpg", quality=100
    )
    Image.new("L", (17, 33), 77).save(root / "dogs" / "gray.png")  # gray and an odd size
    Image.new("RGB", (9, 9), (200, 100, 0)).save(root / "dogs" / "b.BMP")
    (root / "dogs" / "broken.png").write_bytes(_png(Image.new("RGB", (8, 8)))[:40])
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "dogs" / ".hidden.png").write_bytes(b"ignored")
    return root


def test_load_imagefolder_classes_crop_and_bad_files(folder, caplog):
    images, labels, sources, classes, bad = image_folder.load_imagefolder(
        folder, image_size=8, progress=False
    )
    assert sources == ["cats/nested/flat.jpg", "cats/wide.png", "dogs/b.BMP", "dogs/gray.png"]
    assert classes == ["cats", "dogs"]
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    assert [b[0] for b in bad] == ["dogs/broken.png", "dogs/notes.txt"] and bad[0][1]
    assert "not an image" in bad[1][1] and ".png" in bad[1][1]
    assert "dogs/broken.png" in caplog.text and "dogs/notes.txt" in caplog.text
    assert (images[1] == [0, 255, 0]).all()  # centre crop of red|green|blue is all green
    assert (images[3] == 77).all()  # gray repeated to RGB
    assert (images[2] == [200, 100, 0]).all()


def test_load_imagefolder_gray_and_without_classes(folder):
    (folder / "top.png").write_bytes(_png(Image.new("RGB", (5, 5), (255, 255, 255))))
    images, labels, sources, classes, _ = image_folder.load_imagefolder(
        folder, image_size=6, channels=1, progress=False
    )
    assert classes is None and (labels == -1).all()
    assert sources[-1] == "top.png" and images.shape == (5, 6, 6, 1)
    assert (images[-1] == 255).all() and (images[sources.index("dogs/gray.png")] == 77).all()
    (folder / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        image_folder.load_imagefolder(folder / "empty", image_size=4)
    with pytest.raises(DataError, match="does not exist"):
        image_folder.load_imagefolder(folder / "missing", image_size=4)


def test_load_imagefolder_reads_16_bit_gray_gif_and_says_why_it_has_no_labels(tmp_path, caplog):
    (tmp_path / "a").mkdir()
    wide = np.full((6, 6), 0x8080, np.uint16)  # mid-gray in 16 bits: 128 in 8
    Image.fromarray(wide).save(tmp_path / "a" / "deep.png")
    Image.fromarray(wide.astype(np.int32)).save(tmp_path / "a" / "deep.tif")
    Image.new("P", (6, 6), 3).save(tmp_path / "a" / "anim.gif")
    Image.new("RGB", (6, 6)).save(tmp_path / "loose.png")
    images, labels, sources, classes, bad = image_folder.load_imagefolder(
        tmp_path, image_size=6, channels=1, progress=False
    )
    assert sources == ["a/anim.gif", "a/deep.png", "loose.png"]
    assert bad == [("a/deep.tif", bad[0][1])] and "32-bit integer" in bad[0][1]
    assert (images[1] == 128).all()
    assert classes is None and (labels == -1).all() and "loose.png" in caplog.text
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.heic").write_bytes(b"")
    with pytest.raises(DataError, match=r"no images .* other files there: x\.heic"):
        image_folder.load_imagefolder(tmp_path / "only", image_size=4)


def test_build_store_imagefolder_holdout_is_disjoint(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(20):
        Image.new("RGB", (10, 14), (i * 10, 0, 0)).save(root / f"{i:02d}.png")
    (root / "zz_bad.jpg").write_bytes(b"garbage")
    kwargs = dict(source="imagefolder", path=root, image_size=4, seed=1, test_fraction=0.25)
    train = build.build_store(tmp_path / "train", split="train", **kwargs, progress=False)
    test = build.build_store(tmp_path / "test", split="test", **kwargs, progress=False)
    tr, te = load_store(tmp_path / "train"), load_store(tmp_path / "test")
    assert len(tr) == 15 and len(te) == 5 and train["holdout"] and test["holdout"]
    assert set(tr.index["source"]).isdisjoint(te.index["source"])
    assert set(tr.index["source"]) | set(te.index["source"]) == {f"{i:02d}.png" for i in range(20)}
    assert list(tr.index["source"]) == sorted(tr.index["source"])
    assert train["bad_images"][0]["path"] == "zz_bad.jpg"
    assert load_json(tmp_path / "test" / "store.json")["bad_images"][0]["path"] == "zz_bad.jpg"
    assert (tr.index["label"] == -1).all() and train["class_names"] is None
    # red channel encodes the file number: images follow their sources
    numbers = tr.index["source"].str[:2].astype(int).to_numpy()
    np.testing.assert_array_equal(tr.images[:, 0, 0, 0], numbers * 10)

    with pytest.raises(ConfigError, match=r"test split has 3 image\(s\), from data\.test_fr"):
        build.build_store(
            tmp_path / "one", split="test", **kwargs | {"test_fraction": 0.15}, min_images=4
        )
    assert build.MIN_SPLIT_IMAGES == metrics.PR_K + 1

    small = build.build_store(tmp_path / "s", split="train", size=6, **kwargs, progress=False)
    subset = load_store(tmp_path / "s").index["source"]
    assert small["num_samples"] == 6 and set(subset) <= set(tr.index["source"])


def test_build_store_imagefolder_with_test_path(tmp_path):
    for name, n in (("mine", 3), ("held", 2)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", (6, 6), (i, i, i)).save(tmp_path / name / f"{i}.png")
    kwargs = dict(source="imagefolder", path=tmp_path / "mine", test_path=tmp_path / "held")
    for split, n in (("train", 3), ("test", 2)):
        meta = build.build_store(
            tmp_path / split, split=split, image_size=6, **kwargs, progress=False
        )
        assert not meta["holdout"] and meta["num_samples"] == n
        # the folder is identified by its stat fingerprint, not by reading its bytes again
        assert meta["provenance"]["inputs"] == {}
        assert meta["provenance"]["source_fingerprint"]["files"] == n


def test_build_store_imagefolder_with_split_folders(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        (tmp_path / split / "k").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (6, 6), (i, i, i)).save(tmp_path / split / "k" / f"{i}.png")
    meta = build.build_store(
        tmp_path / "out", source="imagefolder", split="test", path=tmp_path, image_size=6,
        progress=False,
    )  # fmt: skip
    store = load_store(tmp_path / "out")
    assert not meta["holdout"] and meta["class_names"] == ["k"]
    assert list(store.index["source"]) == ["val/k/0.png", "val/k/1.png"]


def test_held_out_labels_are_the_training_folders_classes(tmp_path):
    for sub in ("train/a", "train/b", "train/c", "test/b", "test/c", "odd/z"):
        (tmp_path / sub).mkdir(parents=True)
        Image.new("RGB", (6, 6)).save(tmp_path / sub / "0.png")
    kwargs = dict(source="imagefolder", split="test", image_size=6, progress=False)
    meta = build.build_store(tmp_path / "out", path=tmp_path, **kwargs)
    store = load_store(tmp_path / "out")
    assert meta["class_names"] == ["a", "b", "c"]
    assert dict(zip(store.index["source"], store.index["label"], strict=True)) == {
        "test/b/0.png": 1, "test/c/0.png": 2,
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"classes the training images lack: z; allowed: a, b"):
        build.build_store(
            tmp_path / "o2", path=tmp_path / "train", test_path=tmp_path / "odd", **kwargs
        )
    meta = build.build_store(
        tmp_path / "o3", path=tmp_path / "train" / "a", test_path=tmp_path / "odd", **kwargs
    )  # training images without class folders: the held-out folders are no labels either
    assert meta["class_names"] is None and (load_store(tmp_path / "o3").index["label"] == -1).all()


def test_a_file_name_that_is_not_utf8_is_listed_as_bad_not_a_crash(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "held").mkdir()
    for i in range(4):
        Image.new("RGB", (6, 6), (i, 0, 0)).save(images / f"{i}.png")
    Image.new("RGB", (6, 6)).save(os.fsencode(images) + b"/caf\xe9.png")  # Latin-1 name
    meta = build.build_store(
        tmp_path / "out", source="imagefolder", split="train", path=images,
        test_path=tmp_path / "held", image_size=6, progress=False,
    )  # fmt: skip
    assert meta["num_samples"] == 4 and load_store(tmp_path / "out").images.shape[0] == 4
    assert [b["path"] for b in meta["bad_images"]] == ["caf\\xe9.png"]
    assert "not valid UTF-8" in meta["bad_images"][0]["reason"]
    assert (
        fingerprint.source_fingerprint(
            {"source": "imagefolder", "path": images, "test_path": None}, "train"
        )["files"]
        == 5
    )


def test_linked_folders_are_read_once_and_hidden_ones_not_at_all(tmp_path, caplog):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "data" / "cats" / ".cache").mkdir(parents=True)
    Image.new("RGB", (6, 6)).save(tmp_path / "elsewhere" / "d.png")
    Image.new("RGB", (6, 6)).save(tmp_path / "data" / "cats" / "c.png")
    Image.new("RGB", (6, 6)).save(tmp_path / "data" / "cats" / ".cache" / "h.png")
    (tmp_path / "data" / "dogs").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "data" / "cats" / "loop").symlink_to(tmp_path / "data")
    assert image_folder.list_images(tmp_path / "data") == ["cats/c.png", "dogs/d.png"]
    assert "already read" in caplog.text


def test_a_test_folder_without_a_train_folder_is_refused_not_trained_on(tmp_path):
    for sub in ("cats", "val/cats"):
        (tmp_path / sub).mkdir(parents=True)
        Image.new("RGB", (6, 6)).save(tmp_path / sub / "0.png")
    with pytest.raises(ConfigError, match=r"has a val/ folder but no train/ .* class 'val'"):
        build.build_store(
            tmp_path / "out", source="imagefolder", split="train", path=tmp_path, progress=False
        )


# ------------------------------------------------------------------------------ Hugging Face
class _FakeClassLabel:
    names = ("cat", "dog")


class _FakeDataset:
    """The small part of datasets.Dataset that the conversion uses."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = ["image", "label"]
        self.features = {"image": object(), "label": _FakeClassLabel()}

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)


def test_images_from_rows_converts_and_skips_bad():
    rows = [
        {"image": Image.new("RGB", (20, 10), (1, 2, 3)), "label": 1},
        {"image": {"bytes": _png(Image.new("L", (4, 4), 9)), "path": None}, "label": 0},
        {"image": {"bytes": b"broken", "path": None}, "label": 1},
    ]
    images, labels, sources, classes, bad = huggingface.images_from_rows(
        _FakeDataset(rows), prefix="x/train", image_size=4, label_column="label", progress=False
    )
    assert images.shape == (2, 4, 4, 3) and (images[0] == [1, 2, 3]).all()
    assert (images[1] == 9).all()
    np.testing.assert_array_equal(labels, [1, 0])
    assert sources == ["x/train:0", "x/train:1"] and classes == ["cat", "dog"]
    assert [b[0] for b in bad] == ["x/train:2"]
    with pytest.raises(DataError, match="label column"):
        huggingface.images_from_rows(_FakeDataset(rows), prefix="x", image_size=4, label_column="y")


def test_load_huggingface_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"pip install diffprune\[hub\]"):
        huggingface.load_huggingface("jxie/celeba-hq", "train", image_size=8, revision="0a1b2c")


# -------------------------------------------------------------------------- model in and out
def test_model_input_round_trips_exactly_at_native_resolution():
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 7, 7, 3), dtype=np.uint8)
    for images in (every_value, rgb):
        x = tensors.to_model_input(images, images.shape[1])
        assert x.dtype == torch.float32 and x.shape == (
            len(images),
            images.shape[3],
            *images.shape[1:3],
        )
        assert x.min() >= -1 and x.max() <= 1
        np.testing.assert_array_equal(tensors.to_uint8(x), images)
    assert tensors.to_model_input(every_value, 16)[0, 0, 0, 0] == -1.0
    assert tensors.to_model_input(every_value, 16)[0, 0, -1, -1] == 1.0


def test_model_input_resizes_with_antialiasing():
    flat = np.full((2, 28, 28, 1), 200, np.uint8)
    x = tensors.to_model_input(flat, 16)
    assert x.shape == (2, 1, 16, 16)
    np.testing.assert_array_equal(tensors.to_uint8(x), np.full((2, 16, 16, 1), 200, np.uint8))
    stripes = np.zeros((1, 28, 28, 1), np.uint8)
    stripes[:, :, ::2] = 255  # a pattern finer than 8x8 can hold: antialiasing averages it out
    small = tensors.to_uint8(tensors.to_model_input(stripes, 7))
    assert np.abs(small[:, :, 1:-1].astype(int) - 128).max() <= 2  # borders see one side only
    out_of_range = torch.tensor([-3.0, 3.0]).view(1, 1, 1, 2)
    np.testing.assert_array_equal(tensors.to_uint8(out_of_range)[0, 0, :, 0], [0, 255])
    with pytest.raises(ValueError, match="uint8"):
        tensors.to_model_input(flat.astype(np.float32), 16)


def test_store_index_frame_types(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    (tmp_path / "test").mkdir()
    (tmp_path / "train").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "c.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "d.png")
    build.build_store(
        tmp_path / "out", source="imagefolder", split="train", path=tmp_path, image_size=4,
        progress=False,
    )  # fmt: skip
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert index.to_dict("list") == {"sample_id": [0], "label": [-1], "source": ["train/c.png"]}


def test_huggingface_source_reads_a_labelled_dataset_saved_to_disk(tmp_path):
    """The offline stand-in for a hub dataset: the Hugging Face format, labels included."""
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 12), ("validation", 4)):
        pixels = rng.integers(0, 256, (n, 10, 10, 3), dtype=np.uint8)
        splits[split] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(p) for p in pixels], "label": list(range(n))},
            features=datasets.Features(
                {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=n)}
            ),
        )
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "hf")
    meta = build.build_store(
        tmp_path / "store", source="huggingface", split="test", hf_name=str(tmp_path / "hf"),
        hf_split="validation", label_column="label", image_size=8, progress=False,
    )  # fmt: skip
    store = load_store(tmp_path / "store")
    assert (
        store.images.shape == (4, 8, 8, 3)
        and meta["provenance"]["params"]["hf_split"] == "validation"
    )
    assert store.index["label"].tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match="no split 'test'"):
        huggingface.load_huggingface(str(tmp_path / "hf"), "test", image_size=8, progress=False)
