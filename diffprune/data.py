"""Image stores: Fashion-MNIST (IDX files), any folder of images, or a Hugging Face dataset.

A store is one split as `images.npy` (uint8 N,H,W,C), `index.parquet` (sample_id, label, source)
and `store.json`. Every later stage reads images through `load_store` and feeds models through
`to_model_input`, so resizing and scaling happen in exactly one place.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from diffprune.errors import ConfigError, DataError
from diffprune.io import atomic_path, load_json, provenance, save_json, save_npy, save_parquet

log = logging.getLogger(__name__)

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# md5 is of the official .gz download (Debian recompressed its copies, so their .gz bytes differ);
# sha256 is of the decompressed IDX bytes, identical for both sources, and is what we verify.
FASHION_MNIST_FILES: dict[str, dict[str, str]] = {
    "train-images-idx3-ubyte": {
        "url": FASHION_MNIST_URL + "train-images-idx3-ubyte.gz",
        "md5": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "sha256": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    },
    "train-labels-idx1-ubyte": {
        "url": FASHION_MNIST_URL + "train-labels-idx1-ubyte.gz",
        "md5": "25c81989df183df01b3e8a0aad5dffbe",
        "sha256": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    },
    "t10k-images-idx3-ubyte": {
        "url": FASHION_MNIST_URL + "t10k-images-idx3-ubyte.gz",
        "md5": "bef4ecab320f06d8554ea6380940ec79",
        "sha256": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    },
    "t10k-labels-idx1-ubyte": {
        "url": FASHION_MNIST_URL + "t10k-labels-idx1-ubyte.gz",
        "md5": "bb300cfdad3c16e7a12a480ee83cd310",
        "sha256": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

SPLITS = ("train", "test")
SOURCES = ("fashion-mnist", "imagefolder", "huggingface")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_TEST_FOLDERS = ("test", "val", "validation")
_FASHION_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_DOWNLOAD_TIMEOUT_S = 60
_GZIP_MAGIC = b"\x1f\x8b"

# (images uint8 NHWC, labels int64, sources, class names or None, bad files as (source, reason))
LoadedImages = tuple[np.ndarray, np.ndarray, list[str], list[str] | None, list[tuple[str, str]]]


# ---------------------------------------------------------------------------- Fashion-MNIST (IDX)
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into an array."""
    return _parse_idx(_read_bytes(Path(path)), name=str(path))


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if data[:2] == _GZIP_MAGIC else data
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _parse_idx(data: bytes, *, name: str) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{name} is not an IDX file (bad magic {data[:4].hex()!r})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{name}: IDX header says {expected} bytes for shape {shape}, got {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _verified_bytes(path: Path, stem: str, *, origin: str | None = None) -> bytes:
    data = _read_bytes(path)
    actual = hashlib.sha256(data).hexdigest()
    expected = FASHION_MNIST_FILES[stem]["sha256"]
    if actual != expected:
        raise DataError(
            f"{origin or path}: sha256 of the decompressed {stem} is {actual}, expected "
            f"{expected}; the file is corrupt or not Fashion-MNIST: replace it"
        )
    return data


def _download(stem: str, cache_dir: Path) -> Path:
    """Fetch one official file into cache_dir; it only appears there once its hash checks out."""
    url = FASHION_MNIST_FILES[stem]["url"]
    target = cache_dir / f"{stem}.gz"
    log.info("downloading %s to %s", url, target)
    try:
        with atomic_path(target) as tmp:
            with (
                urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response,
                open(tmp, "wb") as f,
            ):
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
            _verified_bytes(tmp, stem, origin=url)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"cannot download {url} ({e}); offline? apt-get install dataset-fashion-mnist, "
            "or set data.path to a folder with the Fashion-MNIST .gz files"
        ) from e
    return target


def fashion_mnist_files(
    split: str, *, path=None, download: bool = True, cache_dir="data/raw"
) -> dict[str, Path]:
    """Locate (or download) the split's image and label files: `path`, Debian, then cache_dir."""
    if split not in _FASHION_PREFIX:
        raise ConfigError(f"Fashion-MNIST split {split!r} is unknown; allowed: {list(SPLITS)}")
    prefix = _FASHION_PREFIX[split]
    stems = {"images": f"{prefix}-images-idx3-ubyte", "labels": f"{prefix}-labels-idx1-ubyte"}
    folders = [Path(p) for p in (path, DEBIAN_FASHION_MNIST, cache_dir) if p is not None]
    for folder in folders:
        found = {kind: _find_file(folder, stem) for kind, stem in stems.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
        if path is not None and folder == Path(path):
            log.warning("Fashion-MNIST %s files not found in %s; looking elsewhere", split, folder)
    if not download:
        raise DataError(
            f"Fashion-MNIST {split} files {sorted(stems.values())} not found in "
            f"{[str(f) for f in folders]} and download=False; "
            "apt-get install dataset-fashion-mnist, or set data.path"
        )
    return {kind: _download(stem, Path(cache_dir)) for kind, stem in stems.items()}


def load_fashion_mnist(
    split: str, *, path=None, download: bool = True, cache_dir="data/raw"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images uint8 (N,28,28,1), labels int64 and sources ("<file>:<row>") of one split.

    Looks in `path`, then the Debian folder, then cache_dir, and downloads the official files into
    cache_dir when none has them (if `download`). Every file is checked against the SHA-256 of its
    decompressed bytes.
    """
    files = fashion_mnist_files(split, path=path, download=download, cache_dir=cache_dir)
    return _read_fashion_mnist(files, split)


def _read_fashion_mnist(
    files: dict[str, Path], split: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    arrays = {}
    for kind, file in files.items():
        stem = file.name.removesuffix(".gz")
        arrays[kind] = _parse_idx(_verified_bytes(file, stem), name=str(file))
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match"
        )
    log.info("read Fashion-MNIST %s: %d images from %s", split, len(images), files["images"].parent)
    stem = files["images"].name.removesuffix(".gz")
    sources = [f"{stem}:{i}" for i in range(len(images))]
    return images[..., None].copy(), labels.astype(np.int64), sources


# ------------------------------------------------------------------------------- image decoding
def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")


def _fit_image(image: Image.Image, *, image_size: int, channels: int) -> np.ndarray:
    """Resize the shorter side to image_size and centre-crop (one antialiased bicubic resample)."""
    image = ImageOps.exif_transpose(image)
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    if (w, h) != (image_size, image_size):
        image = image.resize(
            (image_size, image_size),
            Image.Resampling.BICUBIC,
            box=(left, top, left + side, top + side),
        )
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def _open_image(source: Any) -> Image.Image:
    """Open a path, a PIL image, raw bytes, a datasets-style {"bytes", "path"} dict or an array."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, np.ndarray):
        return Image.fromarray(source)
    image = Image.open(source)
    image.load()  # decode now, so a truncated file fails here and not later
    return image


def _decode_all(
    items: Iterable[tuple[str, Any]],
    *,
    total: int,
    image_size: int,
    channels: int,
    progress: bool,
    desc: str,
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode (source, image) pairs; returns the stacked images, the kept positions and bad ones."""
    out = np.empty((total, image_size, image_size, channels), dtype=np.uint8)
    kept: list[int] = []
    bad: list[tuple[str, str]] = []
    for i, (source, item) in enumerate(tqdm(items, total=total, desc=desc, disable=not progress)):
        try:
            out[len(kept)] = _fit_image(_open_image(item), image_size=image_size, channels=channels)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append((source, f"{type(e).__name__}: {e}"))
            log.warning("skipping unreadable image %s (%s: %s)", source, type(e).__name__, e)
            continue
        kept.append(i)
    return out[: len(kept)], kept, bad


# ----------------------------------------------------------------------------------- imagefolder
def list_images(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the image files under root (recursive, sorted, no hidden ones)."""
    root = Path(root)
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        hidden = any(part.startswith(".") for part in rel.parts)
        if p.suffix.lower() in IMAGE_EXTENSIONS and not hidden and p.is_file():
            files.append(rel.as_posix())
    return sorted(files)


def load_imagefolder(
    root, *, image_size: int, channels: int = 3, progress: bool = True
) -> LoadedImages:
    """Every image under root, resized (shorter side) and centre-cropped to image_size.

    When every image lives in an immediate subfolder of root, those subfolders are the classes
    (sorted names, labels 0..K-1); otherwise labels are -1 and class names None. Unreadable files
    are skipped, logged and returned in `bad` as (relative path, reason).
    """
    _check_channels(channels)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    files = list_images(root)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    class_names = None
    labels = np.full(len(files), -1, dtype=np.int64)
    if all("/" in f for f in files):
        class_names = sorted({f.split("/", 1)[0] for f in files})
        lookup = {name: i for i, name in enumerate(class_names)}
        labels = np.array([lookup[f.split("/", 1)[0]] for f in files], dtype=np.int64)
    images, kept, bad = _decode_all(
        ((f, root / f) for f in files),
        total=len(files),
        image_size=image_size,
        channels=channels,
        progress=progress,
        desc=f"reading {root.name}",
    )
    if not kept:
        raise DataError(f"none of the {len(files)} image files under {root} could be read")
    if bad:
        log.warning(
            "%d of %d files under %s were unreadable and skipped", len(bad), len(files), root
        )
    return images, labels[kept], [files[i] for i in kept], class_names, bad


# ---------------------------------------------------------------------------------- Hugging Face
def load_huggingface(
    name: str,
    split: str,
    *,
    image_size: int,
    channels: int = 3,
    label_column: str | None = None,
    image_column: str | None = None,
    revision: str | None = None,
    progress: bool = True,
) -> LoadedImages:
    """A Hugging Face dataset split (needs the `hub` extra).

    `name` is a hub id (`datasets.load_dataset`, pinned to `revision` when given) or a local folder
    written by `save_to_disk` (`datasets.load_from_disk`): the offline copy of a hub dataset.
    """
    _check_channels(channels)
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            "Hugging Face sources need the `datasets` package: pip install diffprune[hub]"
        ) from e
    try:
        dataset = _open_huggingface(datasets, name, split, revision=revision)
    except Exception as e:  # datasets raises many types (network, missing split, auth)
        raise DataError(
            f"cannot load Hugging Face dataset {name!r} split {split!r} "
            f"({type(e).__name__}: {e}); offline? point data.hf_name at a local copy "
            "(save_to_disk) or use source imagefolder"
        ) from e
    return images_from_rows(
        dataset,
        prefix=f"{name}/{split}",
        image_size=image_size,
        channels=channels,
        label_column=label_column,
        image_column=image_column,
        progress=progress,
    )


def _open_huggingface(datasets: Any, name: str, split: str, *, revision: str | None) -> Any:
    local = Path(name)
    if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KeyError(f"no split {split!r}; the folder has {sorted(loaded)}")
            return loaded[split]
        return loaded
    return datasets.load_dataset(name, split=split, revision=revision)


def images_from_rows(
    dataset: Any,
    *,
    prefix: str,
    image_size: int,
    channels: int = 3,
    label_column: str | None = None,
    image_column: str | None = None,
    progress: bool = True,
) -> LoadedImages:
    """Convert a datasets-like table (len, iteration over row dicts, column_names, features)."""
    columns = list(dataset.column_names)
    if image_column is None:
        image_column = next((c for c in ("image", "img") if c in columns), None)
    if image_column not in columns:
        raise DataError(f"{prefix}: no image column {image_column!r}; columns are {columns}")
    if label_column is not None and label_column not in columns:
        raise DataError(f"{prefix}: label column {label_column!r} not in columns {columns}")
    raw_labels: list[Any] = []

    def items() -> Iterable[tuple[str, Any]]:
        for i, row in enumerate(dataset):
            if label_column is not None:
                raw_labels.append(row[label_column])
            yield f"{prefix}:{i}", row[image_column]

    images, kept, bad = _decode_all(
        items(),
        total=len(dataset),
        image_size=image_size,
        channels=channels,
        progress=progress,
        desc=f"reading {prefix}",
    )
    if not kept:
        raise DataError(f"none of the {len(dataset)} images of {prefix} could be read")
    labels = np.full(len(kept), -1, dtype=np.int64)
    class_names = None
    if label_column is not None:
        values = [raw_labels[i] for i in kept]
        feature = getattr(dataset, "features", {}).get(label_column)
        class_names = list(getattr(feature, "names", None) or []) or None
        if all(isinstance(v, str) for v in values):
            class_names = sorted(set(values))
            lookup = {c: i for i, c in enumerate(class_names)}
            values = [lookup[v] for v in values]
        labels = np.asarray(values, dtype=np.int64)
    return images, labels, [f"{prefix}:{i}" for i in kept], class_names, bad


# ------------------------------------------------------------------------------------ the store
@dataclass
class Store:
    """One split on disk; `images` is memory-mapped (read-only), `index` row i is sample_id i."""

    images: np.ndarray
    index: pd.DataFrame
    meta: dict

    def __len__(self) -> int:
        return len(self.index)


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    if images.shape[-1] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    # ITU-R 601 luma, the same weights as PIL's convert("L")
    weights = np.array([299, 587, 114], dtype=np.uint32)
    return ((images.astype(np.uint32) @ weights + 500) // 1000).astype(np.uint8)[..., None]


def _resize_store_images(images: np.ndarray, image_size: int) -> np.ndarray:
    if images.shape[1:3] == (image_size, image_size):
        return images
    channels = images.shape[-1]
    return np.stack(
        [
            _fit_image(
                Image.fromarray(im.squeeze(-1) if channels == 1 else im),
                image_size=image_size,
                channels=channels,
            )
            for im in images
        ]
    )


def _imagefolder_root(path: Path, split: str, test_path: Path | None) -> tuple[Path, bool]:
    """The folder to read for `split`, and whether a seeded holdout must separate train and test.

    With a separate test_path, train reads all of `path` and test all of test_path. With both
    `train/` and a `test/` (or `val/`, `validation/`) folder under path, each split reads its own.
    Otherwise the train folder (or the root) is split into disjoint train and test parts.
    """
    if test_path is not None:
        return (path if split == "train" else test_path), False
    train = path / "train"
    test = next((path / t for t in _TEST_FOLDERS if (path / t).is_dir()), None)
    if train.is_dir() and test is not None:
        return (train if split == "train" else test), False
    return (train if train.is_dir() else path), True


def holdout_mask(n: int, *, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the test part of a seeded holdout over n items (the same for both splits)."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    n_test = round(n * test_fraction)
    if n_test == 0 or n_test == n:
        raise ConfigError(f"test_fraction {test_fraction} of {n} images leaves an empty split")
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng([seed, 1]).permutation(n)[:n_test]] = True
    return mask


def subset_indices(n: int, *, size: int | None, seed: int) -> np.ndarray:
    """Sorted seeded random subset of `size` items of range(n); all of them when size is None."""
    if size is None:
        return np.arange(n)
    if not 0 < size <= n:
        raise ConfigError(f"size {size!r} is not in 1..{n} (the number of images available)")
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def build_store(
    out_dir,
    *,
    source: str,
    split: str,
    path=None,
    test_path=None,
    download: bool = True,
    size: int | None = None,
    seed: int = 0,
    image_size: int = 28,
    channels: int | None = None,
    hf_name: str | None = None,
    hf_split: str | None = None,
    hf_revision: str | None = None,
    label_column: str | None = None,
    test_fraction: float = 0.1,
    cache_dir="data/raw",
    progress: bool = True,
) -> dict:
    """Write out_dir/{images.npy,index.parquet,store.json} for one split; returns the metadata.

    `size` picks a seeded random subset, kept in source order, so sample_ids 0..n-1 follow the
    source. An imagefolder reads `path` for train and `test_path` for test; without test_path,
    `path/train` and `path/test` (or val, validation) when both exist, else a seeded holdout of
    `test_fraction` splits the folder (disjoint, identical for both splits given the same seed).
    `channels` None keeps the source's own (1 for Fashion-MNIST, 3 otherwise).
    """
    if source not in SOURCES:
        raise ConfigError(f"data source {source!r} is unknown; allowed: {list(SOURCES)}")
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is unknown; allowed: {list(SPLITS)}")
    if channels is not None:
        _check_channels(channels)
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    inputs: dict[str, Path] = {}
    class_names: list[str] | None = None
    bad: list[tuple[str, str]] = []
    holdout = False
    dataset_name = source
    if source == "fashion-mnist":
        files = fashion_mnist_files(split, path=path, download=download, cache_dir=cache_dir)
        images, labels, sources = _read_fashion_mnist(files, split)
        inputs = dict(files)
        class_names = list(FASHION_MNIST_CLASSES)
    elif source == "imagefolder":
        if path is None:
            raise ConfigError("source imagefolder needs data.path (a folder of images)")
        test_folder = None if test_path is None else Path(test_path)
        folder, holdout = _imagefolder_root(Path(path), split, test_folder)
        images, labels, sources, class_names, bad = load_imagefolder(
            folder, image_size=image_size, channels=channels or 3, progress=progress
        )
        # name files relative to data.path, so train/x.png and test/x.png stay distinct
        sub = folder.relative_to(path).as_posix() if folder.is_relative_to(path) else "."
        if sub != ".":
            sources = [f"{sub}/{s}" for s in sources]
            bad = [(f"{sub}/{b}", reason) for b, reason in bad]
        inputs = {"images": folder}
        dataset_name = Path(path).resolve().name
    else:
        if hf_name is None:
            raise ConfigError("source huggingface needs data.hf_name (e.g. 'jxie/celeba-hq')")
        images, labels, sources, class_names, bad = load_huggingface(
            hf_name,
            hf_split or split,
            image_size=image_size,
            channels=channels or 3,
            label_column=label_column,
            revision=hf_revision,
            progress=progress,
        )
        dataset_name = hf_name
    order = np.arange(len(images))
    if holdout:
        in_test = holdout_mask(len(images), test_fraction=test_fraction, seed=seed)
        order = np.flatnonzero(in_test if split == "test" else ~in_test)
    order = order[subset_indices(len(order), size=size, seed=seed)]
    # folder and hub images are already decoded at image_size; Fashion-MNIST may need a resize
    images = _resize_store_images(images[order], image_size)
    images = np.ascontiguousarray(_to_channels(images, channels or images.shape[-1]))
    index = pd.DataFrame(
        {
            "sample_id": np.arange(len(order), dtype=np.int64),
            "label": np.asarray(labels, dtype=np.int64)[order],
            "source": [sources[i] for i in order],
        }
    )
    out_dir = Path(out_dir)
    meta = {
        "dataset": dataset_name,
        "source": source,
        "split": split,
        "shape": list(images.shape),
        "num_samples": len(images),
        "image_size": image_size,
        "channels": int(images.shape[-1]),
        "class_names": class_names,
        "holdout": holdout,
        "bad_images": [{"path": p, "reason": r} for p, r in bad],
        "provenance": provenance(
            params={
                "source": source,
                "split": split,
                "path": None if path is None else str(path),
                "test_path": None if test_path is None else str(test_path),
                "size": size,
                "seed": seed,
                "image_size": image_size,
                "channels": channels,
                "hf_name": hf_name,
                "hf_split": hf_split,
                "hf_revision": hf_revision,
                "label_column": label_column,
                "test_fraction": test_fraction if holdout else None,
            },
            inputs=inputs,
        ),
    }
    save_npy(out_dir / "images.npy", images)
    save_parquet(out_dir / "index.parquet", index)
    save_json(out_dir / "store.json", meta)
    log.info("wrote %s store %s: %s", split, out_dir, images.shape)
    return meta


def load_store(dir) -> Store:
    """Open a store written by build_store; images are memory-mapped read-only."""
    dir = Path(dir)
    paths = [dir / "images.npy", dir / "index.parquet", dir / "store.json"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"image store {dir} is incomplete: missing {missing}; run build_store")
    images = np.load(paths[0], mmap_mode="r")
    index = pd.read_parquet(paths[1])
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(index):
        raise DataError(
            f"image store {dir}: images {images.dtype}{images.shape} do not match "
            f"{len(index)} index rows (expected uint8 N,H,W,C)"
        )
    return Store(images=images, index=index, meta=load_json(paths[2]))


# --------------------------------------------------------------------------- model input/output
def to_model_input(images_uint8_nhwc: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 (N,H,W,C) -> float32 (N,C,res,res) in [-1,1]; antialiased bicubic resize if needed."""
    images = np.asarray(images_uint8_nhwc)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N,H,W,C), got {images.dtype}{images.shape}")
    # a copy: store images are read-only memory maps, which torch.from_numpy warns about
    x = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).float()
    x = x / 127.5 - 1.0
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True)
        x = x.clamp(-1.0, 1.0)
    return x.contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N,C,H,W) in [-1,1] -> uint8 (N,H,W,C); exact inverse of to_model_input's scaling."""
    if x.ndim != 4:
        raise ValueError(f"expected a (N,C,H,W) tensor, got shape {tuple(x.shape)}")
    u = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return u.permute(0, 2, 3, 1).cpu().numpy()
