"""What a split's store was built from, as a fingerprint that changes whenever its files do.

Fashion-MNIST is pinned by checksums and a hub dataset by its revision; a local folder (an image
folder, or a local Hugging Face copy) can change under the same params. Its fingerprint hashes
the relative path and size of every file the split reads, and, by `data.fingerprint`:
- `stat` (the default): its modification time, from `stat` alone, so the Snakefile can compute it
  at every plan for free. Adding, removing, replacing or touching a file changes it, but bytes
  replaced in place by others of the same size with the old mtime restored are not noticed.
- `content`: the SHA-256 of its bytes, for folders edited in place; every plan reads every byte.
Either way a change alters the `download` rule's params, which reruns the store and downstream.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from diffprune.data.huggingface import is_hub_id
from diffprune.data.image_folder import (
    check_heldout_classes,
    folder_classes,
    imagefolder_root,
    list_images,
)
from diffprune.errors import ConfigError, DataError

FINGERPRINT_MODES = ("stat", "content")
DEFAULT_FINGERPRINT = "stat"
CHUNK = 1 << 20


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(
    root: Path, files: list[str], mode: str = DEFAULT_FINGERPRINT
) -> dict[str, Any]:
    """Count, total size and SHA-256 of `relative path, size, mtime (ns) or content SHA-256`."""
    if mode not in FINGERPRINT_MODES:
        raise ConfigError(f"data.fingerprint = {mode!r}; allowed: {', '.join(FINGERPRINT_MODES)}")
    digest, total = hashlib.sha256(), 0
    for name in files:
        stat = (root / name).stat()
        total += stat.st_size
        what = stat.st_mtime_ns if mode == "stat" else _file_sha256(root / name)
        # surrogateescape: a name that is not UTF-8 keeps its own bytes
        digest.update(f"{name}\0{stat.st_size}\0{what}\n".encode("utf-8", "surrogateescape"))
    return {"files": len(files), "bytes": total, "sha256": digest.hexdigest(), "mode": mode}


def _all_files(root: Path) -> list[str]:
    """Every file under root that is not hidden, as sorted relative POSIX paths."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def source_fingerprint(data: dict[str, Any], split: str) -> dict[str, Any] | None:
    """The fingerprint of what `split` reads under the `data` params; None for pinned sources."""
    mode = data.get("fingerprint", DEFAULT_FINGERPRINT)
    if data["source"] == "imagefolder":
        if data["path"] is None:
            raise ConfigError("data.path = null: the imagefolder source needs the folder of images")
        path = Path(data["path"])
        test_path = data.get("test_path")
        if not path.is_dir():
            raise DataError(f"data.path = {str(path)!r}: no such folder of images")
        if test_path is not None and not Path(test_path).is_dir():
            raise DataError(f"data.test_path = {test_path!r}: no such folder of images")
        folder, holdout = imagefolder_root(
            path, split, None if test_path is None else Path(test_path)
        )
        # which folder a split reads, and whether it is a holdout, depend on the layout too
        layout = {"folder": str(folder), "holdout": holdout}
        files = list_images(folder)
        if split == "test" and not holdout:  # its labels are the training folder's classes
            train = imagefolder_root(path, "train", None if test_path is None else Path(test_path))
            layout["train_classes"] = folder_classes(list_images(train[0]))
            check_heldout_classes(layout["train_classes"], files, folder)
        return layout | folder_fingerprint(folder, files, mode)
    if data["source"] == "huggingface" and data.get("hf_name") and not is_hub_id(data["hf_name"]):
        folder = Path(data["hf_name"])
        return {"folder": str(folder)} | folder_fingerprint(folder, _all_files(folder), mode)
    return None
