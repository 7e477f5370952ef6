"""Any folder of images: class subfolders become labels, unreadable files are skipped and listed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from diffprune.data.decode import LoadedImages, check_channels, decode_all
from diffprune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
TEST_FOLDERS = ("test", "val", "validation")


def list_images(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the image files under root (recursive, sorted, no hidden ones)."""
    return _visible_files(root, images=True)


def list_other_files(root: str | os.PathLike) -> list[str]:
    """The files under root that are neither hidden nor images: skipped, but reported."""
    return _visible_files(root, images=False)


def _visible_files(root: str | os.PathLike, *, images: bool) -> list[str]:
    """Image files (or the other files) under root, following linked folders, each folder once."""
    root = Path(root)
    files, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            log.warning("%s is a link to a folder already read (%s): read once", folder, real)
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        for name in names:
            path = Path(folder, name)
            is_image = path.suffix.lower() in IMAGE_EXTENSIONS
            if is_image == images and not name.startswith(".") and path.is_file():
                files.append((rel / name).as_posix())
    return sorted(files)


def printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (os.fsdecode's surrogates) as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def imagefolder_root(path: Path, split: str, test_path: Path | None) -> tuple[Path, bool]:
    """The folder to read for `split`, and whether a seeded holdout must separate train and test.

    With a separate test_path, train reads all of `path` and test all of test_path. With both
    `train/` and a `test/` (or `val/`, `validation/`) folder under path, each split reads its own.
    Otherwise the train folder (or the root) is split into disjoint train and test parts. A test
    folder without a train folder beside it is an error: the root's images would include it as
    one more class, and the held-out images would be trained on.
    """
    if test_path is not None:
        train_dir, test_dir = path.resolve(), test_path.resolve()
        if train_dir.is_relative_to(test_dir) or test_dir.is_relative_to(train_dir):
            raise ConfigError(
                f"data.test_path = {str(test_path)!r} overlaps data.path = {str(path)!r}: one "
                "folder holds the other, so held-out images would be trained on (or training "
                "images held out); allowed: two folders apart, or data.test_path: null for "
                "train/ and test/ folders under data.path"
            )
        return (path if split == "train" else test_path), False
    train = path / "train"
    test = next((path / t for t in TEST_FOLDERS if (path / t).is_dir()), None)
    if train.is_dir() and test is not None:
        return (train if split == "train" else test), False
    if test is not None:
        raise ConfigError(
            f"data.path = {str(path)!r} has a {test.name}/ folder but no train/ folder beside it: "
            f"its images would be trained on as a class {test.name!r}; allowed: the training "
            f"images in {path / 'train'}, or data.test_path = {str(test)!r} with the training "
            "images in a folder of their own"
        )
    return (train if train.is_dir() else path), True


def folder_classes(files: list[str]) -> list[str] | None:
    """The class names of a folder's image files: their first folders, when every file has one."""
    if not files or not all("/" in f for f in files):
        return None
    return sorted({f.split("/", 1)[0] for f in files})


def check_heldout_classes(train_classes: list[str] | None, files: list[str], root: Path) -> None:
    """Refuse held-out images outside class folders when the training images have classes.

    Their labels would be unknown (-1) while the training labels are known, and every
    prediction of the evaluation classifier would count as wrong: a test accuracy of 0.0.
    """
    if train_classes is None or not files or folder_classes(files) is not None:
        return
    loose = [printable(f) for f in files if "/" not in f]
    raise ConfigError(
        f"the held-out images under {root} are not in class folders ({len(loose)} lie directly "
        f"there, e.g. {', '.join(loose[:3])}) while the training images are (classes "
        f"{', '.join(train_classes[:10])}{', ...' if len(train_classes) > 10 else ''}): their "
        "labels would be unknown and the classifier's test accuracy a false 0; allowed: the "
        "held-out images in folders named after the training classes"
    )


def align_classes(
    labels: np.ndarray, classes: list[str], train_classes: list[str] | None, root: Path
) -> tuple[np.ndarray, list[str] | None]:
    """A held-out folder's labels renumbered to the training folder's classes (label i is the
    same class in both splits, even when the held-out folder lacks some classes). Without
    training classes the held-out folders are no classes either: labels -1."""
    if train_classes is None:
        log.warning("the training images have no class folders: %s's folders are no labels", root)
        return np.full(len(labels), -1, dtype=np.int64), None
    extra = sorted(set(classes) - set(train_classes))
    if extra:
        raise ConfigError(
            f"the held-out images under {root} have classes the training images lack: "
            f"{', '.join(extra)}; allowed: {', '.join(train_classes)}"
        )
    lookup = np.array([train_classes.index(name) for name in classes], dtype=np.int64)
    return lookup[labels], list(train_classes)


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
    are skipped, logged and returned in `bad` as (relative path, reason), and so are the files
    that are not images (by extension; hidden files are ignored). With `scratch`, the
    images are decoded into a resumable memory-mapped file there (`decode.decode_all`).
    """
    check_channels(channels)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    files = list_images(root)
    if not files:
        others = [printable(f) for f in list_other_files(root)]
        seen = f"; other files there: {', '.join(others[:5])}" if others else ""
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}{seen}")
    misnamed = [f for f in files if printable(f) != f]
    if misnamed:
        files = [f for f in files if printable(f) == f]
        log.warning("%d image names under %s are not valid UTF-8: skipped", len(misnamed), root)
        if not files:
            raise DataError(f"no image under {root} has a valid UTF-8 name: rename them")
    class_names = folder_classes(files)
    labels = np.full(len(files), -1, dtype=np.int64)
    if class_names is not None:
        lookup = {name: i for i, name in enumerate(class_names)}
        labels = np.array([lookup[f.split("/", 1)[0]] for f in files], dtype=np.int64)
    elif any("/" in f for f in files):
        loose = [f for f in files if "/" not in f]
        log.warning(
            "%d images lie directly under %s (%s), not in a class folder: no labels are used",
            len(loose), root, ", ".join(loose[:5]) + (", ..." if len(loose) > 5 else ""),
        )  # fmt: skip
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
    others = [printable(f) for f in list_other_files(root)]
    if others:
        log.warning(
            "%d files under %s are not images (%s) and were skipped: %s",
            len(others), root, ", ".join(IMAGE_EXTENSIONS), ", ".join(others[:5])
            + (", ..." if len(others) > 5 else ""),
        )  # fmt: skip
    reason = f"not an image: the extension is none of {', '.join(IMAGE_EXTENSIONS)}"
    renamed = "the file name is not valid UTF-8 (the index stores names as text): rename it"
    bad = sorted(bad + [(f, reason) for f in others] + [(printable(f), renamed) for f in misnamed])
    return images, labels[kept], [files[i] for i in kept], class_names, bad
