"""A changed image folder reruns its store and everything downstream (Snakemake's plan)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffprune.config import validate_params
from diffprune.data.build import build_store
from diffprune.data.fingerprint import source_fingerprint
from diffprune.errors import ConfigError, DataError
from tests.test_bad_params import with_changes
from tests.workflow_helpers import make_project, snakemake, tiny_params

CLASSES = ("boots", "coats", "shirts")


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 12), (value, 255 - value, 40)).save(path)


def _folder(root: Path, per_class: int = 8) -> Path:
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            _image(root / name / f"{i:03d}.png", 30 * c + i)
    return root


def _data(root: Path, **extra) -> dict:
    return {"source": "imagefolder", "path": str(root), "test_path": None, **extra}


def test_fingerprint_follows_the_files_a_split_reads(tmp_path):
    root = _folder(tmp_path / "images")
    data = _data(root)
    before = source_fingerprint(data, "train")
    assert before == source_fingerprint(data, "train") and before["files"] == 24
    assert before == source_fingerprint(data, "test")  # a holdout: both read the same files

    (root / "notes.txt").write_text("not an image")
    (root / "boots" / ".thumb.png").write_bytes(b"hidden")
    assert source_fingerprint(data, "train") == before  # neither is read

    changes = [
        lambda: _image(root / "boots" / "new.png", 1),  # added
        lambda: (root / "coats" / "000.png").unlink(),  # removed
        lambda: shutil.rmtree(root / "shirts"),  # a class folder removed
        lambda: _image(root / "boots" / "001.png", 99),  # replaced
        lambda: os.utime(root / "boots" / "002.png", ns=(1, 1)),  # touched
    ]
    seen = [before]
    for change in changes:
        change()
        seen.append(source_fingerprint(data, "train"))
    assert len({fp["sha256"] for fp in seen}) == len(seen)

    # a test/ beside train/ ends the holdout: the train split then reads train/ whole
    split = _folder(tmp_path / "split" / "train")
    data = _data(split.parent)
    holdout = source_fingerprint(data, "train")
    _folder(split.parent / "val", per_class=2)
    separate = source_fingerprint(data, "train")
    assert holdout["holdout"] and not separate["holdout"]
    assert holdout["sha256"] == separate["sha256"] and holdout != separate
    assert source_fingerprint(data, "test")["files"] == 6
    # the held-out labels follow the training classes: a new training class changes test's too
    test_before = source_fingerprint(data, "test")
    _image(split / "dresses" / "000.png", 5)
    assert source_fingerprint(data, "test")["train_classes"] == [
        "boots",
        "coats",
        "dresses",
        "shirts",
    ]
    assert source_fingerprint(data, "test") != test_before

    assert source_fingerprint({"source": "fashion-mnist", "path": None}, "train") is None
    with pytest.raises(DataError, match=r"data\.path = .*: no such folder"):
        source_fingerprint(_data(tmp_path / "missing"), "train")


def test_store_records_the_fingerprint_the_plan_saw(tmp_path):
    root = _folder(tmp_path / "images")
    meta = build_store(
        tmp_path / "s", source="imagefolder", split="test", path=root, image_size=8,
        test_fraction=0.25, progress=False,
    )  # fmt: skip
    recorded = meta["provenance"]["source_fingerprint"]
    assert recorded == source_fingerprint(_data(root), "test") and recorded["files"] == 24


def test_content_mode_catches_a_same_size_replacement_with_its_mtime_restored(tmp_path):
    """Stat mode (the default, free at every plan) cannot see it, as documented; content can."""
    root = _folder(tmp_path / "images", per_class=2)
    target = root / "coats" / "000.png"
    stat_mode, content_mode = _data(root), _data(root, fingerprint="content")
    before = {"stat": source_fingerprint(stat_mode, "train")}
    before["content"] = source_fingerprint(content_mode, "train")
    old, data = target.stat(), bytearray(target.read_bytes())
    data[-20] ^= 0xFF  # other bytes, the same size (a PNG's readers may refuse it: no matter)
    target.write_bytes(bytes(data))
    os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert target.stat().st_size == old.st_size and target.stat().st_mtime_ns == old.st_mtime_ns
    assert source_fingerprint(stat_mode, "train") == before["stat"]  # not noticed: stat only
    assert source_fingerprint(content_mode, "train") != before["content"]
    assert before["stat"]["mode"] == "stat" and before["content"]["mode"] == "content"
    meta = build_store(
        tmp_path / "s", source="imagefolder", split="train", path=root, image_size=8,
        test_fraction=0.25, progress=False, fingerprint="content",
    )  # fmt: skip
    assert meta["provenance"]["params"]["fingerprint"] == "content"  # store.json says which
    assert meta["provenance"]["source_fingerprint"]["mode"] == "content"
    with pytest.raises(ConfigError, match=r"data\.fingerprint = 'mtime' is not allowed"):
        validate_params(with_changes({"data.fingerprint": "mtime"}))


def _planned(root: Path, *targets: str) -> set[str]:
    out = snakemake(root, "--dry-run", *targets)
    text = out.stdout + out.stderr
    return set(re.findall(r"^\s*rule (\w+):$", text, flags=re.M))


@pytest.mark.slow
def test_changed_folder_reruns_download_and_downstream(tmp_path):
    """Added images, a removed class folder and a replaced image each rerun download and embed."""
    images = _folder(tmp_path / "images")
    params = tiny_params(
        data={"source": "imagefolder", "path": str(images), "image_size": 16, "test_fraction": 0.25,
              "train_size": None, "test_size": None},
    )  # fmt: skip
    root = make_project(tmp_path / "project", params)
    targets = ("data/embed/embeddings.npy", "data/store/test/images.npy")
    snakemake(root, *targets)
    assert len(np.load(root / "data/store/train/images.npy")) == 18  # a quarter of 24 held out
    assert _planned(root, *targets) == set()  # nothing to be done
    rerun = {"download", "embed"}

    extra = [images / "boots" / f"extra{i:02d}.png" for i in range(40)]
    for i, path in enumerate(extra):
        _image(path, i)
    assert _planned(root, *targets) == rerun
    for path in extra:  # back as it was: the fingerprint is of the state, not of its history
        path.unlink()
    assert _planned(root, *targets) == set()

    (images / "coats").rename(tmp_path / "coats")
    assert _planned(root, *targets) == rerun
    (tmp_path / "coats").rename(images / "coats")  # a rename keeps sizes and times

    _image(images / "shirts" / "000.png", 200)  # the same name, new pixels
    assert _planned(root, *targets) == rerun
