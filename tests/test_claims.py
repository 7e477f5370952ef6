"""The baseline floor and the claims table on synthetic runs with known answers."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffprune import io
from diffprune.claims import (
    CONTRADICTED,
    INCONCLUSIVE,
    NOT_RUN,
    SUPPORTED,
    check_floor,
    judge_claims,
)
from diffprune.classifier import save_classifier, train_classifier
from diffprune.degenerate import degeneracy
from diffprune.evaluate import class_balance
from diffprune.report import collect, machines_text, table, write_report
from tests.test_classifier import bars

FLOOR = {"max_class_kl": 0.15, "min_share_ratio": 1 / 3}
CLAIMS = {"method": "cluster-furthest", "novelty_metric": "novelty_mean_x", "margin": 0.05}


def runs(effects: dict[str, float], *, seeds=5, spread=20.0, noise=0.5, novelty=None):
    """fd_x per (method, seed): a shared per-seed offset (large) + the method's effect + noise."""
    rng = np.random.default_rng(0)
    offsets = rng.normal(0, spread, size=seeds)
    rows = []
    for method, effect in effects.items():
        for seed in range(seeds):
            rows.append({
                "run": method if method == "full" else f"{method}_r0.5",
                "method": method,
                "ratio": np.nan if method == "full" else 0.5,
                "seed": seed,
                "status": "ok",
                "fd_x": 300 + offsets[seed] + effect + rng.normal(0, noise),
                "novelty_mean_x": (novelty or {}).get(method, 1.0) + rng.normal(0, 0.01),
                "selection_seconds": {"random": 0.01, "el2n": 200.0}.get(method, 50.0),
                "class_kl": 0.05,
                "class_share_ratio_min": 0.8,
            })  # fmt: skip
    return pd.DataFrame(rows)


def verdicts(frame, **kwargs):
    claims = judge_claims(frame, metric="fd_x", higher_is_better=False, **(CLAIMS | kwargs))
    return {(r.claim, r.comparison): r.verdict for r in claims.itertuples()}


def test_claims_follow_the_effects():
    frame = runs(
        {"full": 0, "random": 10, "cluster-furthest": -5, "el2n": 20},
        novelty={"full": 1.0, "random": 1.0, "cluster-furthest": 0.8, "el2n": 1.0},
    )
    v = verdicts(frame)
    assert v["C1", "cluster-furthest - full data"] == SUPPORTED
    assert v["C2", "cluster-furthest - random"] == SUPPORTED
    assert v["C2", "cluster-furthest - el2n"] == SUPPORTED
    assert v["C3", "cluster-furthest - full data"] == SUPPORTED
    assert v["C4", "KL(uniform || generated classes): cluster-balanced arm - random arm"] == NOT_RUN


def test_claims_are_contradicted_when_the_effect_is_the_other_way():
    frame = runs(
        {"full": 0, "random": -10, "cluster-furthest": 30},
        novelty={"full": 1.0, "random": 1.0, "cluster-furthest": 1.3},
    )
    v = verdicts(frame)
    assert v["C1", "cluster-furthest - full data"] == CONTRADICTED
    assert v["C2", "cluster-furthest - random"] == CONTRADICTED
    assert v["C3", "cluster-furthest - full data"] == CONTRADICTED


def test_equal_methods_are_inconclusive_and_one_seed_is_always_inconclusive():
    frame = runs({"full": 0, "random": 0, "cluster-furthest": 0}, noise=3.0)
    assert verdicts(frame)["C2", "cluster-furthest - random"] == INCONCLUSIVE
    one = runs({"full": 0, "random": 50, "cluster-furthest": -50}, seeds=1)
    assert set(verdicts(one).values()) <= {INCONCLUSIVE, NOT_RUN}


def test_c1_margin_is_non_inferiority():
    # 2% worse than full data, precisely: within a 5% margin, outside a 1% margin
    frame = runs({"full": 0, "random": 0, "cluster-furthest": 6}, noise=0.1)
    assert verdicts(frame)["C1", "cluster-furthest - full data"] == SUPPORTED
    assert verdicts(frame, margin=0.01)["C1", "cluster-furthest - full data"] == CONTRADICTED


def test_failed_runs_do_not_count():
    frame = runs({"full": 0, "random": 10, "cluster-furthest": -5})
    frame.loc[frame["method"] == "cluster-furthest", ["status", "fd_x"]] = ["failed", np.nan]
    assert verdicts(frame)["C2", "cluster-furthest - random"] == NOT_RUN


def test_c4_reads_the_skew_table():
    skew = pd.DataFrame({
        "arm": ["random"] * 3 + ["cluster-balanced"] * 3,
        "seed": [0, 1, 2] * 2,
        "generated_kl_to_uniform": [2.0, 2.5, 1.8, 1.0, 1.6, 0.9],
    })  # fmt: skip
    frame = runs({"full": 0, "random": 0, "cluster-furthest": 0})
    claims = judge_claims(frame, metric="fd_x", higher_is_better=False, skew=skew, **CLAIMS)
    c4 = claims[claims["claim"] == "C4"].iloc[0]
    assert c4["verdict"] == SUPPORTED and c4["mean"] == pytest.approx(-0.9333, abs=1e-3)


def test_floor_passes_a_healthy_baseline_and_fails_a_collapsed_one():
    healthy = runs({"full": 0})
    assert check_floor(healthy, **FLOOR).passed is True
    collapsed = healthy.copy()
    collapsed.loc[1, ["class_kl", "class_share_ratio_min"]] = [0.9, 0.0]
    floor = check_floor(collapsed, **FLOOR)
    assert floor.passed is False and "seed 1: KL 0.900" in floor.text and "FAIL" in floor.text
    assert check_floor(runs({"random": 0}), **FLOOR).passed is None


def test_floor_on_real_class_judgements(tmp_path):
    """class_balance + check_floor on samples of every class vs samples of one class only."""
    images, labels = bars(600, seed=0)
    model = train_classifier(
        images, labels, num_classes=3, resolution=16, epochs=3, batch_size=64, seed=0,
        device="cpu", progress=False,
    )  # fmt: skip
    save_classifier(model, tmp_path / "classifier.pt", meta={})
    samples, sample_labels = bars(300, seed=1)
    judged = {
        "healthy": class_balance(samples, classifier_path=tmp_path / "classifier.pt",
                                 train_labels=labels),
        "collapsed": class_balance(samples[sample_labels == 0],
                                   classifier_path=tmp_path / "classifier.pt", train_labels=labels),
    }  # fmt: skip
    assert judged["healthy"]["class_share_ratio_min"] > 0.8
    assert judged["collapsed"]["class_share_ratio_min"] < 0.1
    frame = pd.DataFrame([
        {"method": "full", "seed": seed, "class_kl": judged[name]["class_kl"],
         "class_share_ratio_min": judged[name]["class_share_ratio_min"]}
        for seed, name in enumerate(judged)
    ])  # fmt: skip
    assert check_floor(frame.iloc[:1], **FLOOR).passed is True
    assert check_floor(frame, **FLOOR).passed is False


def test_report_shows_failed_runs_and_kept_fractions(tmp_path):
    frame = runs({"full": 0, "random": 10, "cluster-balanced": 0}, seeds=3)
    frame["kept_fraction"] = np.where(frame["method"] == "cluster-balanced", 0.31, 0.5)
    frame.loc[frame["method"] == "full", "kept_fraction"] = 1.0
    frame.loc[(frame["method"] == "random") & (frame["seed"] == 2), ["status", "fd_x"]] = [
        "failed",
        np.nan,
    ]
    files = []
    for row in frame.to_dict("records"):
        record = {k: v for k, v in row.items() if not (isinstance(v, float) and np.isnan(v))}
        record |= {"n_total": 100, "n_kept": 50, "num_samples": 16, "num_reference": 8}
        record |= {"train_steps": 4, "train_seconds": 1.0}
        if record["status"] == "failed":
            record["failure"] = "training diverged at step 3"
        files.append(tmp_path / "metrics" / f"{row['run']}_s{row['seed']}.json")
        io.save_json(files[-1], record)
    grid = tmp_path / "grid.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(grid)
    collected = collect(files)
    cells = table(collected, "fd_x")
    assert cells.loc["random", "0.5"].endswith("(n=2), 1 failed")
    assert ", kept 0.31" in cells.loc["cluster-balanced", "0.5"]
    assert "kept" not in cells.loc["full-data", "full"]
    report = demo_report(tmp_path, files, grid)
    assert report.startswith("Baseline quality floor")
    assert "random_r0.5 seed 2: training diverged at step 3" in report
    assert "paired against random" in report
    claims = pd.read_csv(tmp_path / "out" / "claims.csv")
    assert set(claims["claim"]) == {"C1", "C2", "C3", "C4"}
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary.loc[summary["status"] == "failed", "fd_x"].isna().all()
    # degenerate clusters (clusters.json of identical images) are warned at the report's top
    flat = pd.DataFrame({"cluster": [0, 0, 1, 1], "distance": np.zeros(4, np.float32)})
    io.save_json(tmp_path / "clusters.json", {"degenerate": degeneracy(flat, k=2)})
    warned = demo_report(tmp_path, files, grid, clusters_meta=tmp_path / "clusters.json")
    assert warned.startswith("> **Warning:** degenerate k-means clusters: clusters [0, 1]")
    assert warned.endswith(report)


def demo_report(tmp_path, files, grid, **extra) -> str:
    """write_report over `files` into tmp_path/out; returns report.md's text."""
    out = {name: tmp_path / "out" / name for name in ("report.md", "claims.md", "claims.csv")}
    write_report(
        files,
        metrics=["fd_x"],
        headline="fd_x",
        floor=FLOOR,
        claims=CLAIMS | {"method": "cluster-balanced"},
        skew_csv=None,
        sample_grids=[("full_s0", grid)],
        tables_dir=tmp_path / "out" / "tables",
        plots_dir=tmp_path / "out" / "plots",
        report_md=out["report.md"],
        claims_md=out["claims.md"],
        claims_csv=out["claims.csv"],
        summary_csv=tmp_path / "out" / "summary.csv",
        mosaic_png=tmp_path / "out" / "samples.png",
        **extra,
    )
    return out["report.md"].read_text()


def test_report_names_the_training_machines():
    frame = pd.DataFrame({"train_machine": ["CPU A", "CPU B", "CPU A", None]})
    text = machines_text(frame)
    assert text.startswith("Trained on: CPU A; CPU B.")
    assert "within the spread over seeds" in text
    assert machines_text(pd.DataFrame({"run": ["x"]})).startswith("Training machine: not recorded")
