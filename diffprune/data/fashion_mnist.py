"""Fashion-MNIST from its IDX files: a local copy, the Debian package, or the official download.

Every file is checked against the SHA-256 of its decompressed bytes before it is used.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import BinaryIO

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
# Shapes of the four files: their IDX headers must say exactly these, which caps what is read.
FASHION_MNIST_SHAPES: dict[str, tuple[int, ...]] = {
    "train-images-idx3-ubyte": (60_000, 28, 28),
    "train-labels-idx1-ubyte": (60_000,),
    "t10k-images-idx3-ubyte": (10_000, 28, 28),
    "t10k-labels-idx1-ubyte": (10_000,),
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_FASHION_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_DOWNLOAD_TIMEOUT_S = 60
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def read_idx(path: str | os.PathLike, *, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into an array.

    The file is decompressed in chunks and never beyond what its header declares, so a corrupt or
    hostile file costs at most the declared size in memory; `shape`, when given, must be the
    header's (checked before any image byte is read).
    """
    return _read_idx_file(Path(path), shape=shape)[0]


def _read_idx_file(
    path: Path, *, shape: tuple[int, ...] | None = None, name: str | None = None
) -> tuple[np.ndarray, str]:
    """The array and the SHA-256 of the decompressed bytes; errors name the file (or `name`)."""
    name = name or str(path)
    compressed = False
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
            return _parse_idx(stream, name=name, shape=shape)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        kind = "gzip data" if compressed else "file"
        raise DataError(f"cannot read {name}: corrupt {kind} ({type(e).__name__}: {e})") from e


def _read_up_to(stream: BinaryIO, n: int) -> bytearray:
    """At most n bytes, fewer only at the end of the stream, read in bounded chunks."""
    data = bytearray()
    while len(data) < n and (chunk := stream.read(min(n - len(data), _CHUNK))):
        data += chunk
    return data


def _parse_idx(
    stream: BinaryIO, *, name: str, shape: tuple[int, ...] | None
) -> tuple[np.ndarray, str]:
    magic = _read_up_to(stream, 4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise DataError(f"{name} is not an IDX file (bad magic {magic.hex()!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[magic[2]]), magic[3]
    dims = _read_up_to(stream, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{name}: the IDX header is truncated ({4 + len(dims)} bytes)")
    found = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    if shape is not None and found != tuple(shape):
        raise DataError(f"{name}: IDX header says shape {found}, expected {tuple(shape)}")
    header = 4 + 4 * ndim
    expected = header + math.prod(found) * dtype.itemsize
    payload = _read_up_to(stream, expected - header)
    if len(payload) < expected - header:
        raise DataError(
            f"{name}: IDX header says {expected} bytes for shape {found}, "
            f"got {header + len(payload)}"
        )
    if stream.read(1):
        raise DataError(
            f"{name}: more than the {expected} bytes its IDX header says for shape {found}"
        )
    digest = hashlib.sha256(magic + dims)
    digest.update(payload)
    array = np.frombuffer(payload, dtype=dtype).reshape(found)
    return array.astype(dtype.newbyteorder("="), copy=False), digest.hexdigest()


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _verified_idx(path: Path, stem: str, *, origin: str | None = None) -> np.ndarray:
    """One Fashion-MNIST file, read within its known shape and checked by its SHA-256."""
    array, actual = _read_idx_file(path, shape=FASHION_MNIST_SHAPES[stem], name=origin)
    expected = FASHION_MNIST_FILES[stem]["sha256"]
    if actual != expected:
        raise DataError(
            f"{origin or path}: sha256 of the decompressed {stem} is {actual}, expected "
            f"{expected}; the file is corrupt or not Fashion-MNIST: replace it"
        )
    return array


def _fetch(url: str, target: Path, *, limit: int) -> str:
    """Stream url into target (at most `limit` bytes); returns the md5 of what was written."""
    md5 = hashlib.md5()
    size = 0
    with (
        urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response,
        open(target, "wb") as f,
    ):
        for chunk in iter(lambda: response.read(_CHUNK), b""):
            size += len(chunk)
            if size > limit:
                raise DataError(
                    f"{url}: the download is larger than {limit} bytes, more than the gzip of "
                    "its Fashion-MNIST file can be; stopped"
                )
            md5.update(chunk)
            f.write(chunk)
    return md5.hexdigest()


def _download(stem: str, cache_dir: Path) -> Path:
    """Fetch one official file into cache_dir; it only appears there once its hashes check out.

    The compressed download is checked against the published md5 before anything is
    decompressed; then the decompressed bytes, read within the known shape, by their SHA-256.
    """
    url = FASHION_MNIST_FILES[stem]["url"]
    target = cache_dir / f"{stem}.gz"
    # gzip adds a few bytes per 32 KiB block to incompressible data, never more
    limit = _idx_size(stem) * 11 // 10 + (1 << 16)
    log.info("downloading %s to %s", url, target)
    try:
        with atomic_path(target) as tmp:
            md5 = _fetch(url, tmp, limit=limit)
            expected = FASHION_MNIST_FILES[stem]["md5"]
            if md5 != expected:
                raise DataError(
                    f"{url}: md5 of the download is {md5}, expected {expected} (the official "
                    f"{stem}.gz); not decompressed, nothing kept: try again or set data.path"
                )
            _verified_idx(tmp, stem, origin=url)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"cannot download {url} ({e}); offline? apt-get install dataset-fashion-mnist, "
            "or set data.path to a folder with the Fashion-MNIST .gz files"
        ) from e
    return target


def _idx_size(stem: str) -> int:
    """Bytes of the decompressed IDX file: header (magic, one uint32 per dimension) and data."""
    shape = FASHION_MNIST_SHAPES[stem]
    return 4 + 4 * len(shape) + math.prod(shape)


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
    arrays = {
        kind: _verified_idx(file, file.name.removesuffix(".gz")) for kind, file in files.items()
    }
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match"
        )
    log.info("read Fashion-MNIST %s: %d images from %s", split, len(images), files["images"].parent)
    stem = files["images"].name.removesuffix(".gz")
    sources = [f"{stem}:{i}" for i in range(len(images))]
    return images[..., None].copy(), labels.astype(np.int64), sources
