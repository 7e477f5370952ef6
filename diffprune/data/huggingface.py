"""A Hugging Face dataset split: a hub id (needs the `hub` extra) or a local copy of one.

A hub id must be pinned to a revision (`data.hf_revision`, best a commit sha): hub datasets
change under their names, and the same params must give the same store. A tag or branch is read
at the commit it resolves to, which the store records. A local copy (a `save_to_disk` folder, or
a folder of data files) is tracked by its files' fingerprint instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from diffprune.data.decode import LoadedImages, check_channels, decode_all
from diffprune.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def is_hub_id(name: str) -> bool:
    """A hub id names nothing on this machine; a local copy is a folder."""
    return not Path(name).exists()


def check_revision(name: str, revision: str | None) -> None:
    """A hub id needs a pinned revision; a local copy has none (its files are fingerprinted)."""
    if not is_hub_id(name) and revision is not None:
        log.warning(
            "data.hf_revision = %r is not used: data.hf_name %r is a local copy, which is "
            "tracked by its files",
            revision,
            name,
        )
    if is_hub_id(name) and revision is None:
        raise ConfigError(
            f"data.hf_revision = null: the hub dataset {name!r} must be pinned to a revision "
            "(a commit sha, tag or branch), so that the same params give the same store; its "
            f"current commit: huggingface_hub.HfApi().dataset_info({name!r}).sha"
        )


def resolve_revision(name: str, revision: str | None) -> str | None:
    """The commit that `revision` (a sha, tag or branch) of hub dataset `name` is now.

    The store is read at this commit and records it, so a tag or branch that moves later does
    not change what a store says it holds. None for a local copy.
    """
    check_revision(name, revision)
    if not is_hub_id(name):
        return None
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise DataError(
            "Hugging Face sources need the `datasets` package: pip install diffprune[hub]"
        ) from e
    try:
        return HfApi().dataset_info(name, revision=revision).sha
    except Exception as e:  # network, unknown repo or revision, auth
        raise DataError(
            f"cannot resolve data.hf_revision = {revision!r} of hub dataset {name!r} "
            f"({type(e).__name__}: {e}); offline? point data.hf_name at a local copy (save_to_disk)"
        ) from e


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
    scratch: Path | None = None,
) -> LoadedImages:
    """A Hugging Face dataset split (needs the `hub` extra).

    `name` is a hub id (`datasets.load_dataset` at `revision`, which it needs) or a local folder:
    one written by `save_to_disk` (`datasets.load_from_disk`, the offline copy of a hub dataset)
    or one of data files (`datasets.load_dataset`), both without a revision.
    """
    check_channels(channels)
    check_revision(name, revision)
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
        scratch=scratch,
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


def integer_classes(values: list[Any], where: str) -> list[str]:
    """Class names "0".."K-1" of a plain integer label column, K = its largest label + 1.

    The integers are the classes themselves, so label i is the same class in every split (a
    held-out split may lack some); numbering the distinct values instead would not keep that.
    Anything but integers >= 0 is refused: no label may turn into a wrong class.
    """
    wrong = [v for v in values if isinstance(v, bool) or not isinstance(v, int | np.integer)]
    if wrong:
        raise DataError(
            f"{where} holds {type(wrong[0]).__name__} values ({wrong[0]!r}); allowed: integer "
            "class labels 0..K-1, strings (class names) or a ClassLabel feature"
        )
    if min(values) < 0:
        raise DataError(f"{where} holds the label {min(values)}; allowed: 0..K-1")
    k = int(max(values)) + 1
    missing = sorted(set(range(k)) - {int(v) for v in values})
    if missing:
        log.warning(
            "%s: labels span 0..%d but %d of them never occur (%s): they stay classes",
            where, k - 1, len(missing), ", ".join(map(str, missing[:5])),
        )  # fmt: skip
    return [str(i) for i in range(k)]


def images_from_rows(
    dataset: Any,
    *,
    prefix: str,
    image_size: int,
    channels: int = 3,
    label_column: str | None = None,
    image_column: str | None = None,
    progress: bool = True,
    scratch: Path | None = None,
) -> LoadedImages:
    """Convert a datasets-like table (len, iteration over row dicts, column_names, features).

    With `scratch`, the images are decoded into a resumable memory-mapped file there.
    """
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

    images, kept, bad = decode_all(
        items(),
        total=len(dataset),
        image_size=image_size,
        channels=channels,
        progress=progress,
        desc=f"reading {prefix}",
        scratch=scratch,
        key=f"{prefix}:{len(dataset)}:{image_column}",
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
        if class_names is None:
            class_names = integer_classes(values, f"{prefix} column {label_column!r}")
    return images, labels, [f"{prefix}:{i}" for i in kept], class_names, bad
