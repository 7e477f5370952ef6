"""Atomic writes, content hashes and provenance records.

Every artifact is written to a temporary name in its destination folder, flushed to disk (fsync)
and renamed into place when complete, and the folder's new entry is flushed too: an interrupted
job or a power loss never leaves a half-written file behind under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffprune import __version__

if TYPE_CHECKING:  # pandas costs a quarter second to import; the Snakefile plans through here
    import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    The temporary file (or folder, with everything in it) is fsynced before the rename and the
    parent folder after it, so the new name never points at data that is not on disk yet.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        fsync_tree(tmp)
        if directory and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_tree(path: Path) -> None:
    """Flush a file, or a folder with every file and subfolder in it, to disk."""
    if not path.is_dir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for child in sorted(path.iterdir()):
        fsync_tree(child)
    fsync_directory(path)


def fsync_directory(path: Path) -> None:
    """Flush a folder's entries (names created or renamed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_parquet(path: str | os.PathLike, df: pd.DataFrame) -> None:
    """Write without the pandas index and without timestamps, so equal frames give equal bytes."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False, engine="pyarrow", compression="zstd")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a directory's files (relative names and contents, sorted walk)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            name = file.relative_to(path).as_posix()
            digest.update(name.encode("utf-8", "surrogateescape") + b"\0")  # any name's bytes
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def code_version() -> str:
    """Package version plus the git commit (and '-dirty') when run from a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "diffprune"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+{commit}{'-dirty' if dirty else ''}"


def provenance(*, params: dict[str, Any], inputs: dict[str, str | os.PathLike]) -> dict[str, Any]:
    """What made an artifact: the params it read, the code version and its inputs' hashes."""
    return {
        "code_version": code_version(),
        "params": params,
        "inputs": {name: file_sha256(p) for name, p in sorted(inputs.items())},
    }


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
