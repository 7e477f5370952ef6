"""A workspace file damaged after `dvc repro` must not damage the DVC cache or be re-blessed.

Each test builds a one-stage DVC project with this repository's .dvc/config, damages the stage's
output in the workspace, then checks the cache, `dvc status` and a second `dvc repro`. With the
old `cache.type = hardlink` the same scenario corrupts the cache and DVC records the damaged bytes
in dvc.lock: that test documents the defect the config avoids.
"""

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.workflow_helpers import REPO, dvc, run

CONTENT = bytes(range(256)) * 16  # 4096 bytes
WRITE = "open('out.bin', 'wb').write(bytes(range(256)) * 16)"
DIGEST = hashlib.md5(CONTENT).hexdigest()
ORIGINAL = {"path": "out.bin", "hash": "md5", "md5": DIGEST, "size": len(CONTENT)}  # in dvc.lock


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def lock_entry(root: Path) -> dict:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    (out,) = lock["stages"]["make"]["outs"]
    return out


def cache_file(root: Path, digest: str) -> Path:
    return root / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]


def truncate(path: Path) -> None:
    os.truncate(path, 1000)


def flip_bit(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)[0]
        f.seek(100)
        f.write(bytes([byte ^ 1]))


def project(root: Path, cache_type: str | None = None) -> Path:
    """A git + DVC project with this repo's .dvc/config (or `cache_type` over it), reproduced."""
    root.mkdir()
    run(["git", "init", "-q"], root)
    dvc(root, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    if cache_type is not None:  # config.local overrides config, as on a user's machine
        (root / ".dvc" / "config.local").write_text(f"[cache]\n    type = {cache_type}\n")
    stage = {"cmd": f'python -c "{WRITE}"', "outs": ["out.bin"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": stage}}))
    dvc(root, "repro", "-q")
    assert (root / "out.bin").read_bytes() == CONTENT
    assert lock_entry(root) == ORIGINAL
    return root


def damage(path: Path, how: Callable[[Path], None]) -> None:
    """Write into the file in place, as root can despite its read-only mode (kept as it was)."""
    mode = path.stat().st_mode
    path.chmod(mode | stat.S_IWUSR)
    how(path)
    path.chmod(mode)
    assert path.read_bytes() != CONTENT


@pytest.mark.parametrize("how", [truncate, flip_bit])
def test_damaged_workspace_file_leaves_the_cache_intact_and_is_restored(tmp_path, how):
    root = project(tmp_path / "p")
    out, cached = root / "out.bin", cache_file(root, DIGEST)
    assert out.stat().st_nlink == 1 and not out.is_symlink()  # a copy, not a link to the cache
    damage(out, how)
    assert md5(cached.read_bytes()) == DIGEST
    status = json.loads(dvc(root, "status", "--json").stdout)
    assert status == {"make": [{"changed outs": {"out.bin": "modified"}}]}
    dvc(root, "repro", "-q")
    assert out.read_bytes() == CONTENT
    assert lock_entry(root) == ORIGINAL
    assert json.loads(dvc(root, "status", "--json").stdout) == {}


def test_hardlink_cache_is_corrupted_through_the_workspace(tmp_path):
    """The defect the config avoids: the workspace file is the cache file, and DVC believes it."""
    root = project(tmp_path / "p", cache_type="hardlink")
    out, cached = root / "out.bin", cache_file(root, DIGEST)
    assert out.stat().st_ino == cached.stat().st_ino
    damage(out, truncate)
    assert cached.stat().st_size == 1000 and md5(cached.read_bytes()) != DIGEST
    dvc(root, "repro", "-q")  # reruns the stage, then links the damaged cache file back
    assert out.stat().st_size == 1000 and lock_entry(root) == ORIGINAL
    assert json.loads(dvc(root, "status", "--json").stdout) == {}  # "up to date"
