"""Fashion-MNIST from its IDX files: a local copy, the Debian package, or the official download.

Every file is checked against the SHA-256 of its decompressed bytes before it is used.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from diffprune.errors import ConfigError, DataError
from diffprune.io import atomic_path

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

_FASHION_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_DOWNLOAD_TIMEOUT_S = 60
_GZIP_MAGIC = b"\x1f\x8b"


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
        raise ConfigError(
            f"Fashion-MNIST split {split!r} is unknown; allowed: {list(_FASHION_PREFIX)}"
        )
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
    return read_fashion_mnist(files, split)


def read_fashion_mnist(
    files: dict[str, Path], split: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read and verify the image and label files that fashion_mnist_files found."""
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
