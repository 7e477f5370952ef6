"""Atomic writes, disk space, content hashes and provenance records.

Every artifact is written to a temporary name in its destination folder, flushed to disk (fsync)
and renamed into place when complete, and the folder's new entry is flushed too: an interrupted
job or a power loss never leaves a half-written file behind under the final name.

The temporary of ``<name>`` is the hidden ``.<name>.<pid>.<random>.tmp`` of the writing process.
A failed write removes it; one left by a killed process (its pid gone) is removed when the output
is written again, so a killed job's half-written output never fills the disk for good. A large
write states its size: the free space is checked first (and a memory-mapped file is allocated on
disk before it is mapped), so a full disk is one `DiskFull` line naming the path and the bytes
needed and available, never a SIGBUS or a serializer's traceback.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffprune import __version__
from diffprune.errors import DiskFull

if TYPE_CHECKING:  # pandas costs a quarter second to import; the Snakefile plans through here
    import pandas as pd

log = logging.getLogger(__name__)

# Free bytes under which a failed write counts as a full disk (torch.save, for one, reports a
# full disk as "RuntimeError: [enforce fail at inline_container.cc...]", without an errno).
NEARLY_FULL = 1 << 20


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, directory: bool = False, nbytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    The temporary file (or folder, with everything in it) is fsynced before the rename and the
    parent folder after it, so the new name never points at data that is not on disk yet.
    Temporaries of `path` that killed processes left are removed first; with `nbytes` (the
    size to be written), too little free space raises `DiskFull` before anything is written.
    A write that fails on a full disk raises `DiskFull` too, and never leaves its temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    if nbytes is not None:
        check_space(path, nbytes)
    prefix = f".{path.name}.{os.getpid()}."
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        fsync_tree(tmp)
        if directory and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as err:
        written = _size(tmp)
        full = _out_of_space(err, path)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if full:
            needed = f"{nbytes} bytes needed" if nbytes else f"over {written} bytes needed"
            raise DiskFull(
                f"no space left on device writing {path}: {needed}, "
                f"{_free(path)} available; free space there, then rerun"
            ) from None
        raise
    fsync_directory(path.parent)


def check_space(path: str | os.PathLike, nbytes: int) -> None:
    """Raise `DiskFull` when the file system that holds `path` has fewer than `nbytes` bytes
    free for it."""
    free = _free(Path(path))
    if free < nbytes:
        raise DiskFull(
            f"not enough disk space to write {_output(path)}: {nbytes} bytes needed, {free} "
            "available; free space there, then rerun"
        )


def open_memmap(path: str | os.PathLike, *, dtype: np.dtype | str, shape: tuple[int, ...]):
    """A new .npy file at `path`, memory-mapped for writing, its whole size allocated on disk.

    Writing through a map into a sparse file kills the process with SIGBUS (no message, no
    cleanup) when the disk fills up; allocated first, a full disk is one `DiskFull` line. The
    file is removed when that fails.
    """
    path = Path(path)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        size = path.stat().st_size  # sparse yet: the header's block at most is allocated
        check_space(path, size)
        _allocate(path, size)
    except BaseException:
        del array
        path.unlink(missing_ok=True)
        raise
    return array


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of `path` (see the module docstring) whose process is gone, and
    those of older versions (without a pid); returns what was deleted."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?:(\d+)\.)?[a-z0-9_]+\.tmp")
    removed = []
    with os.scandir(path.parent) as entries:
        for entry in entries:
            found = pattern.fullmatch(entry.name)
            if found is None or (found[1] is not None and _alive(int(found[1]))):
                continue
            stale = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale)
    if removed:
        log.info("removed temporaries that a killed process left: %s", [p.name for p in removed])
    return removed


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
    with atomic_path(path, nbytes=array.nbytes) as tmp, open(tmp, "wb") as f:
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


def _free(path: Path) -> int:
    """Free bytes for this process on the file system of `path` (or of its nearest folder)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _output(path: str | os.PathLike) -> Path:
    """The output that `path` is the temporary of (atomic_path's naming), or `path` itself."""
    path = Path(path)
    found = re.fullmatch(r"\.(.+)\.\d+\.[a-z0-9_]+\.tmp", path.name)
    return path.with_name(found[1]) if found else path


def _allocate(path: Path, size: int) -> None:
    """Allocate `size` bytes of disk to the file at `path` now (posix_fallocate)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(
                f"no space left on device writing {_output(path)}: {size} bytes needed, "
                f"{_free(path)} available; free space there, then rerun"
            ) from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate: the check stands
            raise
    finally:
        os.close(fd)


def _out_of_space(err: BaseException, path: Path) -> bool:
    """Whether a failed write of `path` failed for a full disk."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(err, DiskFull | KeyboardInterrupt | SystemExit):
        return False
    return isinstance(err, OSError | RuntimeError) and _free(path) < NEARLY_FULL


def _size(path: Path) -> int:
    """Bytes of a file, or of the files in a folder, that exist (0 when none)."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files if p.exists())


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (a temporary's writer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
