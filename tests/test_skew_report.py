"""The fairness study's report: balance of each arm's training data and samples, failed runs."""

import numpy as np
import pandas as pd
import pytest

from diffprune import io
from diffprune.skew import arm_manifest
from diffprune.skew_report import COLUMNS, balance, write_skew_report


def test_balance_reports_minority_share_and_kl():
    report = balance(np.array([0, 0, 0, 1]), num_classes=2, minority_classes=[1])
    assert report["minority_share"] == 0.25 and report["shares"] == [0.75, 0.25]
    assert report["kl_to_uniform"] > 0
    assert balance(np.array([0, 1]), num_classes=2, minority_classes=[1])["kl_to_uniform"] < 1e-5


def arm_files(root, arm, kept, metrics):
    """One arm's manifest (over 8 samples) and metrics JSON, as the skew runs write them."""
    manifest = root / f"{arm}.parquet"
    io.save_parquet(manifest, arm_manifest(8, np.asarray(kept), None))
    record = root / f"{arm}.json"
    io.save_json(record, {"run": f"skew-{arm}", "seed": 0, "n_kept": len(kept), **metrics})
    return record, manifest


def test_skew_report_rows_per_arm_with_failed_runs_shown_as_failed(tmp_path):
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    index = tmp_path / "index.parquet"
    io.save_parquet(index, pd.DataFrame({"sample_id": np.arange(8), "label": labels}))
    ok = {"status": "ok", "class_shares": [0.5, 0.5], "fd_classifier": 3.0, "num_samples": 16}
    skewed = arm_files(tmp_path, "skewed", range(8), ok)
    failed = arm_files(tmp_path, "random", [0, 6], {"status": "failed", "failure": "diverged"})
    out = {name: tmp_path / "out" / name for name in ("skew.csv", "skew.md", "shares.png")}
    frame = write_skew_report(
        [skewed[0], failed[0]],
        [skewed[1], failed[1]],
        index=index,
        class_names=["a", "b"],
        minority_classes=[1],
        table_csv=out["skew.csv"],
        table_md=out["skew.md"],
        plot_png=out["shares.png"],
    )
    assert frame["arm"].tolist() == ["skewed", "random"]
    assert frame["train_minority_share"].tolist() == [0.25, 0.5]
    assert frame["generated_minority_share"].iloc[0] == pytest.approx(0.5)
    assert frame["generated_kl_to_uniform"].iloc[0] == pytest.approx(0, abs=1e-6)
    assert np.isnan(frame["generated_kl_to_uniform"].iloc[1])
    assert list(pd.read_csv(out["skew.csv"]).columns) == COLUMNS
    table = out["skew.md"].read_text()
    assert "| random | 0 | 2 | 0.500 | 0.000 | failed | failed | failed |" in table
    assert out["shares.png"].stat().st_size > 0


def test_skew_report_says_when_the_study_is_off(tmp_path):
    index = tmp_path / "index.parquet"
    io.save_parquet(index, pd.DataFrame({"sample_id": [0, 1], "label": [0, 1]}))
    out = {name: tmp_path / name for name in ("skew.csv", "skew.md", "shares.png")}
    frame = write_skew_report(
        [], [], index=index, class_names=None, minority_classes=[1],
        table_csv=out["skew.csv"], table_md=out["skew.md"], plot_png=out["shares.png"],
    )  # fmt: skip
    assert frame.empty and list(pd.read_csv(out["skew.csv"]).columns) == COLUMNS
    assert "off" in out["skew.md"].read_text()
