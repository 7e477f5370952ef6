"""Build one split's store from a source: pick the images (holdout, seeded subset), fit, record.

`build_store` is the `download` rule's whole job; each source module only reads its images.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from diffprune.data.decode import check_channels, fit_image
from diffprune.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    fashion_mnist_files,
    read_fashion_mnist,
)
from diffprune.data.fingerprint import DEFAULT_FINGERPRINT, source_fingerprint
from diffprune.data.huggingface import load_huggingface, resolve_revision
from diffprune.data.image_folder import (
    align_classes,
    folder_classes,
    imagefolder_root,
    list_images,
    load_imagefolder,
)
from diffprune.data.store import write_store
from diffprune.errors import ConfigError
from diffprune.io import provenance

SPLITS = ("train", "test")
# the workflow's reference statistics of a split (metrics.reference_neighbours) need k + 1 rows
# for precision/recall's k = metrics.PR_K nearest neighbours (tests/test_data.py checks both agree)
MIN_SPLIT_IMAGES = 4


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
            fit_image(
                Image.fromarray(im.squeeze(-1) if channels == 1 else im),
                image_size=image_size,
                channels=channels,
            )
            for im in images
        ]
    )


def holdout_mask(n: int, *, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the test part of a seeded holdout over n items (the same for both splits)."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction = {test_fraction!r}; allowed: 0 < test_fraction < 1")
    n_test = round(n * test_fraction)
    if n_test == 0 or n_test == n:
        raise ConfigError(
            f"data.test_fraction = {test_fraction} of the {n} readable images puts {n_test} in the "
            f"test split and {n - n_test} in train; allowed: a fraction that leaves both splits "
            "at least one image, or held-out images of your own (data.test_path, or train/ and "
            "test/ folders)"
        )
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng([seed, 1]).permutation(n)[:n_test]] = True
    return mask


def subset_indices(n: int, *, size: int | None, seed: int, key: str = "size") -> np.ndarray:
    """Sorted seeded random subset of `size` items of range(n); all of them when size is None.

    `key` names the param that set `size`, for the error.
    """
    if size is None:
        return np.arange(n)
    if not 0 < size <= n:
        raise ConfigError(
            f"{key} = {size!r}, but {n} images are available; allowed: 1..{n}, or null for all"
        )
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
    batch_size: int = 1024,
    min_images: int = 1,
    fingerprint: str = DEFAULT_FINGERPRINT,
) -> dict:
    """Write out_dir/{images.npy,index.parquet,store.json} for one split; returns the metadata.

    `size` picks a seeded random subset, kept in source order, so sample_ids 0..n-1 follow the
    source. An imagefolder reads `path` for train and `test_path` for test; without test_path,
    `path/train` and `path/test` (or val, validation) when both exist, else a seeded holdout of
    `test_fraction` splits the folder (disjoint, identical for both splits given the same seed).
    `channels` None keeps the source's own (1 for Fashion-MNIST, 3 otherwise).

    Memory stays O(batch_size) images: folder and hub images are decoded into a memory-mapped
    scratch file in out_dir (resumed after a crash, removed at the end), and the store's
    images.npy is written from it `batch_size` images at a time. Fewer than `min_images` images
    in the split is a ConfigError (the workflow's references need MIN_SPLIT_IMAGES).
    `fingerprint` (stat | content) is how a local folder is identified (`data.fingerprint`).
    """
    _check_request(source, split, channels, image_size)
    # stat the files before reading them: the plan saw this state (data.smk's fingerprint)
    seen = source_fingerprint(
        {
            "source": source, "path": path, "test_path": test_path, "hf_name": hf_name,
            "fingerprint": fingerprint,
        },
        split,
    )  # fmt: skip
    recipe = {
        "source": source, "split": split, "path": path, "test_path": test_path,
        "image_size": image_size, "channels": channels, "hf_name": hf_name, "hf_split": hf_split,
        "label_column": label_column, "fingerprint": seen,
    }  # fmt: skip
    read = READERS[source](
        SourceRequest(
            out_dir=Path(out_dir), split=split, path=path, test_path=test_path,
            download=download, image_size=image_size, channels=channels, hf_name=hf_name,
            hf_split=hf_split, hf_revision=hf_revision, label_column=label_column,
            cache_dir=cache_dir, progress=progress, recipe=recipe,
        )
    )  # fmt: skip
    images, labels, sources = read.images, read.labels, read.sources
    order = _split_order(
        read, split=split, size=size, seed=seed, test_fraction=test_fraction, min_images=min_images
    )
    # folder and hub images are already decoded at image_size; Fashion-MNIST may need a resize
    out_channels = channels or images.shape[-1]
    shape = (len(order), image_size, image_size, out_channels)
    batches = (
        _to_channels(
            _resize_store_images(images[order[at : at + batch_size]], image_size), out_channels
        )
        for at in range(0, len(order), batch_size)
    )
    index = pd.DataFrame(
        {
            "sample_id": np.arange(len(order), dtype=np.int64),
            "label": np.asarray(labels, dtype=np.int64)[order],
            "source": [sources[i] for i in order],
        }
    )
    params = {
        "source": source, "split": split, "path": None if path is None else str(path),
        "test_path": None if test_path is None else str(test_path), "size": size, "seed": seed,
        "image_size": image_size, "channels": channels, "hf_name": hf_name, "hf_split": hf_split,
        "hf_revision": hf_revision, "label_column": label_column,
        "test_fraction": test_fraction if read.holdout else None, "fingerprint": fingerprint,
    }  # fmt: skip
    meta = _store_meta(read, shape=shape, params=params, fingerprint=seen)
    write_store(out_dir, batches, shape, index, meta)
    for scratch in Path(out_dir).glob(".decoding-*"):
        shutil.rmtree(scratch)
    return meta


def _check_request(source: str, split: str, channels: int | None, image_size: int) -> None:
    if source not in SOURCES:
        raise ConfigError(f"data source {source!r} is unknown; allowed: {list(SOURCES)}")
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is unknown; allowed: {list(SPLITS)}")
    if channels is not None:
        check_channels(channels)
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")


def _split_order(
    read: SourceImages, *, split: str, size: int | None, seed: int, test_fraction: float,
    min_images: int,
) -> np.ndarray:  # fmt: skip
    """The source rows of `split`, in source order: the seeded holdout's side of a folder without
    a test split, then a seeded `size` subset; fewer than `min_images` is a ConfigError."""
    order = np.arange(len(read.images))
    if read.holdout:
        in_test = holdout_mask(len(read.images), test_fraction=test_fraction, seed=seed)
        order = np.flatnonzero(in_test if split == "test" else ~in_test)
    order = order[subset_indices(len(order), size=size, seed=seed, key=f"data.{split}_size")]
    if len(order) < min_images:
        where = "data.test_fraction" if read.holdout else f"data.{split}_size or the images there"
        raise ConfigError(
            f"the {split} split has {len(order)} image(s), from {where}; its reference statistics "
            f"(FD, precision/recall) need at least {min_images}: allowed: a larger "
            f"data.{split}_size or data.test_fraction, or more images (held-out ones: "
            "data.test_path, or train/ and test/ folders)"
        )
    return order


def _store_meta(
    read: SourceImages, *, shape: tuple[int, ...], params: dict, fingerprint: dict
) -> dict:
    """store.json: what the store holds, the images that were refused, and its provenance."""
    return {
        "dataset": read.dataset_name,
        "source": params["source"],
        "split": params["split"],
        "shape": list(shape),
        "num_samples": shape[0],
        "image_size": params["image_size"],
        "channels": int(shape[-1]),
        "class_names": read.class_names,
        "holdout": read.holdout,
        "bad_images": [{"path": p, "reason": r} for p, r in read.bad],
        "provenance": provenance(params=params, inputs=read.inputs)
        | {"source_fingerprint": fingerprint, "hf_commit": read.hf_commit},
    }


def _scratch_dir(out_dir, recipe: dict) -> Path:
    """Where a split's images are decoded before the store is written: one folder per recipe
    (params, the source's fingerprint or commit), so a resumed build continues only the same work.
    """
    text = json.dumps(recipe, sort_keys=True, default=str)
    return Path(out_dir) / f".decoding-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class SourceRequest:
    """What a source reader needs: build_store's arguments that say where and how to read."""

    out_dir: Path
    split: str
    path: Any
    test_path: Any
    download: bool
    image_size: int
    channels: int | None
    hf_name: str | None
    hf_split: str | None
    hf_revision: str | None
    label_column: str | None
    cache_dir: Any
    progress: bool
    recipe: dict


@dataclass
class SourceImages:
    """One split as a source reader returns it, before the subset and the store are made."""

    images: np.ndarray
    labels: Any
    sources: list[str]
    class_names: list[str] | None
    dataset_name: str
    bad: list[tuple[str, str]] = field(default_factory=list)
    inputs: dict[str, Path] = field(default_factory=dict)
    holdout: bool = False
    hf_commit: str | None = None


def _read_fashion_mnist(req: SourceRequest) -> SourceImages:
    files = fashion_mnist_files(
        req.split, path=req.path, download=req.download, cache_dir=req.cache_dir
    )
    images, labels, sources = read_fashion_mnist(files, req.split)
    return SourceImages(
        images, labels, sources, list(FASHION_MNIST_CLASSES), "fashion-mnist", inputs=dict(files)
    )


def _read_imagefolder(req: SourceRequest) -> SourceImages:
    if req.path is None:
        raise ConfigError("source imagefolder needs data.path (a folder of images)")
    path, split = req.path, req.split
    test_folder = None if req.test_path is None else Path(req.test_path)
    folder, holdout = imagefolder_root(Path(path), split, test_folder)
    images, labels, sources, class_names, bad = load_imagefolder(
        folder,
        image_size=req.image_size,
        channels=req.channels or 3,
        progress=req.progress,
        scratch=_scratch_dir(req.out_dir, req.recipe),
    )
    if split == "test" and not holdout and class_names is not None:
        train_folder = imagefolder_root(Path(path), "train", test_folder)[0]
        train_classes = folder_classes(list_images(train_folder))
        labels, class_names = align_classes(labels, class_names, train_classes, folder)
    # name files relative to data.path, so train/x.png and test/x.png stay distinct
    sub = folder.relative_to(path).as_posix() if folder.is_relative_to(path) else "."
    if sub != ".":
        sources = [f"{sub}/{s}" for s in sources]
        bad = [(f"{sub}/{b}", reason) for b, reason in bad]
    # no content hash of the folder: `source_fingerprint` (the stat of every file the split
    # reads) identifies it, and DVC hashes the folder as the stage's dep; hashing here would
    # read every byte a second time (150 GB for ImageNet)
    name = Path(path).resolve().name
    return SourceImages(images, labels, sources, class_names, name, bad, holdout=holdout)


def _read_huggingface(req: SourceRequest) -> SourceImages:
    if req.hf_name is None:
        raise ConfigError("source huggingface needs data.hf_name (e.g. 'jxie/celeba-hq')")
    hf_commit = resolve_revision(req.hf_name, req.hf_revision)
    images, labels, sources, class_names, bad = load_huggingface(
        req.hf_name,
        req.hf_split or req.split,
        image_size=req.image_size,
        channels=req.channels or 3,
        label_column=req.label_column,
        revision=hf_commit,
        progress=req.progress,
        scratch=_scratch_dir(req.out_dir, req.recipe | {"hf_commit": hf_commit}),
    )
    return SourceImages(images, labels, sources, class_names, req.hf_name, bad, hf_commit=hf_commit)


# data.source -> the function that reads one split of it
READERS: dict[str, Callable[[SourceRequest], SourceImages]] = {
    "fashion-mnist": _read_fashion_mnist,
    "imagefolder": _read_imagefolder,
    "huggingface": _read_huggingface,
}
SOURCES = tuple(READERS)
