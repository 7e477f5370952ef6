"""Any folder of images: class subfolders become labels, unreadable files are skipped and listed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from diffprune.data.decode import LoadedImages, check_channels, decode_all
from diffprune.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
TEST_FOLDERS = ("test", "val", "validation")


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


def imagefolder_root(path: Path, split: str, test_path: Path | None) -> tuple[Path, bool]:
    """The folder to read for `split`, and whether a seeded holdout must separate train and test.

    With a separate test_path, train reads all of `path` and test all of test_path. With both
    `train/` and a `test/` (or `val/`, `validation/`) folder under path, each split reads its own.
    Otherwise the train folder (or the root) is split into disjoint train and test parts.
    """
    if test_path is not None:
        return (path if split == "train" else test_path), False
    train = path / "train"
    test = next((path / t for t in TEST_FOLDERS if (path / t).is_dir()), None)
    if train.is_dir() and test is not None:
        return (train if split == "train" else test), False
    return (train if train.is_dir() else path), True


def load_imagefolder(
    root,
    *,
    image_size: int,
    channels: int = 3,
    progress: bool = True,
    scratch: Path | None = None,
) -> LoadedImages:
    """Every image under root, resized (shorter side) and centre-cropped to image_size.

    When every image lives in an immediate subfolder of root, those subfolders are the classes
    (sorted names, labels 0..K-1); otherwise labels are -1 and class names None. Unreadable files
    are skipped, logged and returned in `bad` as (relative path, reason). With `scratch`, the
    images are decoded into a resumable memory-mapped file there (`decode.decode_all`).
    """
    check_channels(channels)
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
    images, kept, bad = decode_all(
        ((f, root / f) for f in files),
        total=len(files),
        image_size=image_size,
        channels=channels,
        progress=progress,
        desc=f"reading {root.name}",
        scratch=scratch,
        key="\n".join([str(root), *files]),
    )
    if not kept:
        raise DataError(f"none of the {len(files)} image files under {root} could be read")
    if bad:
        log.warning(
            "%d of %d files under %s were unreadable and skipped", len(bad), len(files), root
        )
    return images, labels[kept], [files[i] for i in kept], class_names, bad
