"""benchmarks/gpu_check.py's CPU smoke mode: every section runs and the report adds up."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
        cwd=REPO, check=True, capture_output=True, text=True,
    )  # fmt: skip
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    train = report["train"]
    assert report["dry_run"] and train["forward_flops_per_image"] > 0
    assert train["train_flops_per_image"] == 3 * train["forward_flops_per_image"]
    for name, peak in report["environment"]["peaks_flops"].items():
        achieved = train["train_flops_per_image"] * train["images_per_s"]
        assert train["mfu"][name] == pytest.approx(achieved / peak)
    run = report["train_run"]  # diffprune.train itself, from its train.json summary
    assert run["images_per_s"] > 0 and run["flops_per_image"] > 0
    assert run["mfu_train_json"] is None and "cpu" in run["mfu_note"]  # no CPU peak is assumed
    assert run["ratio_to_loop"] == pytest.approx(run["images_per_s"] / train["images_per_s"])
    assert report["sample"]["images_per_s"] > 0 and report["embed"]["32px"]["images_per_s"] > 0
    assert report["kmeans"]["seconds"] > 0
    assert "| train | DiT custom" in (tmp_path / "gpu_check.md").read_text()
