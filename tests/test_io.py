"""Atomic writes: fsync before the rename and of the folder after it; nothing partial on failure."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from diffprune import io


@pytest.fixture
def fsyncs(monkeypatch, tmp_path) -> list[tuple[Path, bool]]:
    """Record each fsync as (the path its descriptor is open on, whether tmp_path/out exists)."""
    calls: list[tuple[Path, bool]] = []

    def record(fd: int) -> None:
        calls.append((Path(os.readlink(f"/proc/self/fd/{fd}")), (tmp_path / "out").exists()))

    monkeypatch.setattr(os, "fsync", record)
    return calls


def is_temporary(path: Path, name: str) -> bool:
    return path.name.startswith(f".{name}.") and path.name.endswith(".tmp")


def write(tmp: Path, directory: bool, data: bytes) -> None:
    """Write `data` to the temporary file, or to a file `part` in the temporary folder."""
    (tmp / "part" if directory else tmp).write_bytes(data)


WRITERS = {
    "npy": lambda path: io.save_npy(path, np.arange(5)),
    "json": lambda path: io.save_json(path, {"a": 1}),
    "parquet": lambda path: io.save_parquet(path, pd.DataFrame({"a": [1, 2]})),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_writers_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path, fsyncs, kind):
    target = tmp_path / "out"
    WRITERS[kind](target)
    (file, target_existed), (folder, target_exists) = fsyncs
    assert is_temporary(file, target.name) and not target_existed
    assert folder == tmp_path and target_exists
    assert sorted(tmp_path.iterdir()) == [target]


def test_a_folder_is_fsynced_file_by_file_before_the_rename(tmp_path, fsyncs):
    target = tmp_path / "out"
    with io.atomic_path(target, directory=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b")
        (tmp / "a.bin").write_bytes(b"a")
    before, (parent, after) = fsyncs[:-1], fsyncs[-1]
    assert [path.relative_to(tmp) for path, _ in before] == [
        Path("a.bin"),
        Path("sub/b.bin"),
        Path("sub"),
        Path("."),
    ]
    assert not any(existed for _, existed in before)
    assert parent == tmp_path and after
    assert (target / "sub" / "b.bin").read_bytes() == b"b"


@pytest.mark.parametrize("directory", [False, True])
def test_failure_while_writing_leaves_no_target_and_no_temporary(tmp_path, directory):
    target = tmp_path / "out"
    with (
        pytest.raises(RuntimeError, match="disk on fire"),
        io.atomic_path(target, directory=directory) as tmp,
    ):
        write(tmp, directory, b"half")
        raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("directory", [False, True])
def test_failed_fsync_keeps_the_old_target_and_leaves_no_temporary(
    tmp_path, monkeypatch, directory
):
    """fsync reports write errors (a full disk, a failing device): the old version stays."""
    target = tmp_path / "out"
    with io.atomic_path(target, directory=directory) as tmp:
        write(tmp, directory, b"old")

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with (
        pytest.raises(OSError, match="Input/output error"),
        io.atomic_path(target, directory=directory) as tmp,
    ):
        write(tmp, directory, b"new")
    assert list(tmp_path.iterdir()) == [target]
    assert (target / "part" if directory else target).read_bytes() == b"old"
