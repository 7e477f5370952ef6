"""End to end: the tiny study through Snakemake, then DVC on the same artifacts."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from diffprune import paths
from diffprune.dvc_yaml import RUN_ENV, SEEDS
from tests.workflow_helpers import (
    TINY,
    dvc,
    generate_dvc_yaml,
    make_project,
    planned_jobs,
    snakemake,
    tiny_params,
    write_params,
)

pytestmark = pytest.mark.slow
PER_RUN_RULES = {"select", "train", "sample", "evaluate"}
# One seed: each train or sample job costs ~8 s of imports (diffusers), so a second seed doubles
# most of the study. Seeds side by side are run by test_seeds_of_a_stage_run_side_by_side_in_dvc;
# the confidence interval's arithmetic and format by test_stats and test_claims.
STUDY = tiny_params(study={**TINY["study"], "seeds": [0]})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study run once by Snakemake; tests below only read it or dry-run against it."""
    root = make_project(tmp_path_factory.mktemp("study"), STUDY)
    snakemake(root)
    return root


def test_study_outputs_hold_what_the_params_asked_for(study):
    n = len(pd.read_parquet(study / paths.store_index("train")))
    assert n == 120
    random = pd.read_parquet(study / paths.manifest("random_r0.5", 0))
    assert list(random.columns) == ["sample_id", "keep", "score", "cluster", "distance"]
    assert random["keep"].sum() == 60 and len(random) == n
    full = pd.read_parquet(study / paths.manifest("full", 0))
    assert full["keep"].all()

    samples = np.load(study / paths.samples("random_r0.5", 0))
    assert samples.shape == (16, 8, 8, 1) and samples.dtype == np.uint8

    metrics = json.loads((study / paths.metrics("cluster-furthest_r0.5", 0)).read_text())
    furthest = pd.read_parquet(study / paths.manifest("cluster-furthest_r0.5", 0))
    sizes = furthest.groupby("cluster").size()
    assert metrics["n_kept"] == furthest["keep"].sum() == sum(size // 2 for size in sizes)
    assert np.isfinite(metrics["fd_classifier"]) and metrics["fd_classifier"] > 0
    assert np.isfinite(metrics["fd_efficientnet_lite0"])
    assert metrics["num_samples"] == 16 and metrics["num_reference"] == 60

    for key in (
        "precision_classifier",
        "recall_classifier",
        "vendi_classifier",
        "novelty_mean_classifier",
        "mode_coverage_classifier",
        "class_kl",
    ):
        assert np.isfinite(metrics[key]), key
    assert 0 <= metrics["precision_classifier"] <= 1 and 1 <= metrics["vendi_classifier"] <= 16
    assert len(metrics["class_shares"]) == 10 and abs(sum(metrics["class_shares"]) - 1) < 1e-4

    table = pd.read_csv(study / paths.report_table("fd_classifier", "csv"), index_col="method")
    assert set(table.index) == {"full-data", "random", "cluster-furthest", "cluster-balanced"}
    assert list(table.columns) == ["full", "0", "0.5"]
    fd = metrics_of(study, "random_r0.5")["fd_classifier"]
    assert table.loc["random", "0.5"] == f"{fd:.4g} (n=1)"
    # the paper's balanced rule (p = 0): m = the smallest cluster from every cluster
    paper_rule = pd.read_parquet(study / paths.manifest("cluster-balanced_r0.0", 0))
    sizes = paper_rule.groupby("cluster").size()
    assert (paper_rule[paper_rule["keep"]].groupby("cluster").size() == sizes.min()).all()
    assert "kept" in table.loc["cluster-balanced", "0"]  # kept k*m/N, not 1 - 0
    for plot in ("fd_classifier", "recall_classifier", "cost"):
        assert (study / paths.report_plot(plot)).stat().st_size > 1000
    report = (study / paths.report_markdown()).read_text()
    assert "generated samples per run" in report and report.startswith("Baseline quality floor")
    claims = pd.read_csv(study / paths.claims("csv"))
    assert set(claims["claim"]) == {"C1", "C2", "C3", "C4"}
    assert set(claims["verdict"]) <= {"supported", "contradicted", "inconclusive", "not run"}
    c4 = claims[claims["claim"] == "C4"].iloc[0]
    assert c4["verdict"] == "not run"  # the tiny study's fairness arms have no random arm


def test_skew_study_rebalances_and_reports(study):
    skew = pd.read_csv(study / paths.skew_table("csv"))
    assert list(skew.query("seed == 0")["arm"]) == ["cluster-balanced", "label-balanced"]
    label_balanced = skew.query("seed == 0").set_index("arm").loc["label-balanced"]
    # 60 skewed images, 2 per minority class; the oracle keeps 30 // 10 = 3 per class, at most 2
    assert label_balanced["n_train"] == 7 * 3 + 3 * 2
    assert label_balanced["train_minority_share"] == pytest.approx(6 / 27)
    assert (study / paths.skew_plot()).stat().st_size > 1000


def test_score_methods_run_end_to_end(study):
    """The score profile at tiny size: surrogates, scores once, manifests for every score rule."""
    methods = ["el2n", "grand-inverse", "forgetting", "moso-mid"]
    params = STUDY | dict(
        study={**STUDY["study"], "methods": methods},
        scores={**STUDY["scores"], "steps": 4, "num_snapshots": 2, "moso_steps": 2,
                "moso_snapshots": 1, "batch_size": 16},
    )  # fmt: skip
    write_params(study, params)
    try:
        targets = [str(paths.manifest(f"{m}_r0.5", 0)) for m in methods]
        snakemake(study, *targets)
    finally:
        write_params(study, STUDY)
    for method in methods:
        manifest = pd.read_parquet(study / paths.manifest(f"{method}_r0.5", 0))
        assert manifest["keep"].sum() == 60 and manifest["score"].notna().all()
        meta = json.loads((study / paths.manifest_meta(f"{method}_r0.5", 0)).read_text())
        assert meta["compute"]["scores_seconds"] > 0  # surrogate training + scoring
    el2n = pd.read_parquet(study / paths.manifest("el2n_r0.5", 0))
    assert el2n.loc[el2n["keep"], "score"].min() >= el2n.loc[~el2n["keep"], "score"].max()


def test_snakemake_report_and_dvc_plots(study, tmp_path):
    html = tmp_path / "report.html"
    snakemake(study, "--report", str(html))
    text = html.read_text(errors="replace")
    assert "cost.png" in text and "random_r0.5_s0.png" in text
    plots = dvc(study, "plots", "show", "--json").stdout
    assert "dvclive" in plots and "results/plots" in plots


def metrics_of(study, run, seed=0):
    return json.loads((study / paths.metrics(run, seed)).read_text())


def test_second_run_does_nothing(study):
    assert planned_jobs(study) == []


def test_changing_one_ratio_reruns_only_that_ratio(study, tmp_path):
    params = STUDY | {"study": {**STUDY["study"], "ratios": [0.5, 0.75]}}
    write_params(study, params)
    try:
        jobs = planned_jobs(study)
    finally:
        write_params(study, STUDY)
    per_run = [job for job in jobs if job["rule"] in PER_RUN_RULES]
    assert {job["rule"] for job in jobs} == PER_RUN_RULES | {"report"}
    assert {job["wildcards"]["run"] for job in per_run} == {
        "random_r0.75",
        "cluster-furthest_r0.75",
    }
    assert len(per_run) == 2 * 4  # two methods, one seed, four rules


def test_dvc_records_a_snakemake_run_without_recomputing(study):
    dvc(study, "init", "--quiet", check=False)
    dvc(study, "commit", "--force", "--quiet")
    status = dvc(study, "status").stdout
    assert "Data and pipelines are up to date" in status
    repro = dvc(study, "repro").stdout
    assert "Running stage" not in repro
    # dvc commit rewrote the files (same bytes, new times); the way back to Snakemake
    # (docs/snakemake-and-dvc.md):
    assert planned_jobs(study) != []
    snakemake(study, "--touch")
    assert planned_jobs(study) == []
    assert "Data and pipelines are up to date" in dvc(study, "status").stdout


def test_dvc_repro_rebuilds_the_same_bytes(study):
    manifest = study / paths.manifest("cluster-furthest_r0.5", 0)
    before = manifest.read_bytes()
    manifest.unlink()
    # --force: run the stage's command (Snakemake) rather than restore the cached output.
    out = dvc(study, "repro", "--force", "--single-item", "select_cluster-furthest_r0p5").stdout
    assert "Running stage 'select_cluster-furthest_r0p5'" in out
    assert manifest.read_bytes() == before


def test_seeds_of_a_stage_run_side_by_side_in_dvc(study):
    """With two seeds, `select_random_r0p5` is one stage that hands Snakemake both jobs, one core
    each (`--cores 2`): seed 0 comes out with the bytes Snakemake wrote, seed 1 with its own."""
    manifests = [study / paths.manifest("random_r0.5", seed) for seed in (0, 1)]
    before = manifests[0].read_bytes()
    write_params(study, STUDY | {"study": {**STUDY["study"], "seeds": [0, 1]}})
    generate_dvc_yaml(study)
    try:
        stage = yaml.safe_load((study / "dvc.yaml").read_text())["stages"]["select_random_r0p5"]
        assert f"{RUN_ENV}={SEEDS} snakemake --cores 2 " in stage["cmd"]
        out = dvc(study, "repro", "--single-item", "select_random_r0p5").stdout
    finally:
        write_params(study, STUDY)
        generate_dvc_yaml(study)
    assert "Running stage 'select_random_r0p5'" in out
    assert manifests[0].read_bytes() == before
    kept = [set(pd.read_parquet(m).query("keep")["sample_id"]) for m in manifests]
    assert len(kept[1]) == len(kept[0]) and kept[1] != kept[0]  # another seed, another draw


def test_dvc_exp_show_lists_the_metric_per_run(study):
    from tests.workflow_helpers import run

    run(["git", "add", "-A"], study)
    run(["git", "commit", "-qm", "tiny study"], study)
    shown = json.loads(dvc(study, "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "results/metrics/random_r0.5/s0.json" in text
    assert "fd_classifier" in text
