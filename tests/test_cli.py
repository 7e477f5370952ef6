import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from diffprune.cli import main
from diffprune.cluster import clusters_frame, kmeans
from diffprune.evaluate import metrics_record
from diffprune.io import file_sha256, load_json, save_parquet
from diffprune.names import CLUSTER_METHODS
from diffprune.select import select

N_PER, K = 40, 3


@pytest.fixture
def user_files(tmp_path):
    """A user's float64 embeddings (3 blobs of 40 in 5-D) and a score per sample."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 20, size=(K, 5))
    embeddings = np.concatenate([rng.normal(c, 1.0, size=(N_PER, 5)) for c in centres])
    np.save(tmp_path / "emb.npy", embeddings)
    np.save(tmp_path / "scores.npy", rng.permutation(K * N_PER).astype(np.float64))
    return tmp_path


def run(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_select_clusters_a_users_npy(user_files, capsys):
    out = user_files / "run" / "manifest.parquet"
    argv = ["select", "--embeddings", user_files / "emb.npy", "--method", "cluster-furthest"]
    argv += ["--ratio", 0.5, "--k", K, "--seed", 0, "--out", out]
    code, stdout, stderr = run(argv, capsys)
    assert code == 0, stderr
    assert stdout.strip() == f"{out}: kept 60 of 120 samples (cluster-furthest, p=0.5)"

    manifest = pd.read_parquet(out)
    embeddings = np.load(user_files / "emb.npy")
    expected = select(
        "cluster-furthest", 0.5, clusters=clusters_frame(kmeans(embeddings, k=K, device="cpu"))
    )
    pd.testing.assert_frame_equal(manifest, expected)  # the CLI is the library, nothing else
    assert manifest.groupby("cluster")["keep"].sum().tolist() == [20, 20, 20]

    meta = json.loads(out.with_suffix(".json").read_text())
    assert {k: meta[k] for k in ("run", "method", "ratio", "direction", "seed", "k", "init")} == {
        "run": "cluster-furthest_r0.5",
        "method": "cluster-furthest",
        "ratio": 0.5,
        "direction": "furthest",
        "seed": 0,
        "k": 3,
        "init": "k-means++",
    }
    assert (meta["n_total"], meta["n_kept"], meta["kept_fraction"]) == (120, 60, 0.5)
    assert meta["kept_per_cluster"] == {"0": 20, "1": 20, "2": 20}
    assert meta["provenance"]["inputs"] == {"embeddings": file_sha256(user_files / "emb.npy")}
    assert meta["provenance"]["code_version"]
    compute = meta["compute"]
    assert compute["clusters_seconds"] >= 0 and compute["select_seconds"] >= 0
    assert compute["total_seconds"] == compute["clusters_seconds"] + compute["select_seconds"]
    assert "furthest from the centroid" in meta["keeps"]
    assert meta["embedder"] is None


def test_select_by_scores(user_files, capsys):
    out = user_files / "m.parquet"
    argv = ["select", "--scores", user_files / "scores.npy", "--method", "el2n-inverse"]
    code, _, stderr = run([*argv, "--ratio", 0.75, "--out", out], capsys)
    assert code == 0, stderr
    manifest = pd.read_parquet(out)
    scores = np.load(user_files / "scores.npy")
    np.testing.assert_array_equal(manifest["score"], scores)
    assert sorted(scores[manifest["keep"]]) == list(range(30))  # the 30 lowest of 0..119
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["direction"], meta["k"], meta["n_kept"]) == ("lowest", None, 30)
    assert meta["provenance"]["inputs"] == {"scores": file_sha256(user_files / "scores.npy")}


def test_select_from_clusters_file_and_embedder_sidecar(user_files, capsys):
    embeddings = np.load(user_files / "emb.npy")
    clusters = clusters_frame(kmeans(embeddings, k=K, device="cpu"))
    save_parquet(user_files / "clusters.parquet", clusters)
    argv = ["select", "--clusters", user_files / "clusters.parquet", "--method"]
    argv += ["cluster-balanced", "--ratio", 0.9, "--out", user_files / "b.parquet"]
    assert run(argv, capsys)[0] == 0
    meta = json.loads((user_files / "b.json").read_text())
    # floor(120 * 0.1) = 12 -> 4 per cluster
    assert meta["kept_per_cluster"] == {"0": 4, "1": 4, "2": 4} and meta["k"] == 3

    (user_files / "emb.json").write_text(json.dumps({"model": "efficientnet-lite0"}))
    argv = ["select", "--embeddings", user_files / "emb.npy", "--method", "random"]
    assert run([*argv, "--ratio", 0.25, "--out", user_files / "r.parquet"], capsys)[0] == 0
    meta = json.loads((user_files / "r.json").read_text())
    assert (meta["embedder"], meta["n_kept"], meta["k"]) == ("efficientnet-lite0", 90, None)


def test_a_cli_manifest_is_read_by_evaluation_as_a_workflow_one(user_files, capsys, random_images):
    """The CLI writes the workflow's sidecar (select.sidecar): evaluation reads its run id and
    selection compute, which the CLI's own format once lacked."""
    out = user_files / "m.parquet"
    argv = ["select", "--scores", user_files / "scores.npy", "--method", "grand-mid"]
    assert run([*argv, "--ratio", 0.5, "--seed", 2, "--out", out], capsys)[0] == 0
    selection = load_json(out.with_suffix(".json"))
    record = metrics_record(
        selection=selection,
        training={"status": "ok", "steps": 10, "wall_seconds": 1.0},
        samples=random_images(4),
        compute_metrics=lambda: {"fd_classifier": 1.0},
    )
    assert record["run"] == "grand-mid_r0.5" and record["seed"] == 2
    assert (record["n_total"], record["n_kept"], record["kept_fraction"]) == (120, 60, 0.5)
    assert record["selection_seconds"] == selection["compute"]["select_seconds"] > 0
    assert record["status"] == "ok" and record["fd_classifier"] == 1.0


def test_select_is_byte_identical(user_files, capsys):
    for name in ("a", "b"):
        argv = ["select", "--embeddings", user_files / "emb.npy", "--method", "cluster-random"]
        argv += ["--ratio", 0.3, "--k", K, "--seed", 5, "--out", user_files / f"{name}.parquet"]
        assert run(argv, capsys)[0] == 0
    assert (user_files / "a.parquet").read_bytes() == (user_files / "b.parquet").read_bytes()


def bad_files(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(10))
    np.save(tmp_path / "cube.npy", np.zeros((10, 2, 2)))
    nan = np.random.default_rng(0).normal(size=(10, 2))
    nan[4, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "short.npy", np.zeros(3))
    (tmp_path / "text.npy").write_text("not an array\n")


EMB = ["--embeddings", "{tmp}/emb.npy"]
CLUSTER = ["--method", "cluster-nearest", "--k", "3"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--embeddings", "{tmp}/flat.npy", *CLUSTER, "--ratio", "0.5"], "got shape (10,)"),
        (["--embeddings", "{tmp}/cube.npy", *CLUSTER, "--ratio", "0.5"], "2-D array (N, D)"),
        (["--embeddings", "{tmp}/nan.npy", *CLUSTER, "--ratio", "0.5"], "NaN or inf in 1 of"),
        ([*EMB, *CLUSTER, "--ratio", "1"], "ratio must be in [0, 1)"),
        ([*EMB, *CLUSTER, "--ratio", "1.5"], "(the fraction of samples REMOVED), got 1.5"),
        ([*EMB, *CLUSTER, "--ratio", "-0.1"], "got -0.1"),
        ([*EMB, *CLUSTER, "--ratio", "nan"], "ratio must be in [0, 1)"),
        ([*EMB, *CLUSTER, "--ratio", "half"], "argument --ratio: invalid float value: 'half'"),
        ([*EMB, "--method", "random", "--k", "500", "--ratio", "0.5"], None),  # k unused: fine
        ([*EMB, "--method", "cluster-mid", "--k", "500", "--ratio", "0.5"], "--k = 500 is larger"),
        ([*EMB, "--method", "cluster-mid", "--k", "0", "--ratio", "0.5"], "k must be at least 1"),
        ([*EMB, "--method", "furthest", "--ratio", "0.5"], "unknown selection method 'furthest'"),
        ([*EMB, "--method", "cluster-mid", "--ratio", "0.5"], "pass --k"),
        (["--embeddings", "{tmp}/missing.npy", *CLUSTER, "--ratio", "0.5"], "cannot read"),
        (["--embeddings", "{tmp}/text.npy", *CLUSTER, "--ratio", "0.5"], "cannot read"),
        (["--method", "el2n", "--ratio", "0.5"], "method 'el2n' needs --scores"),
        (["--method", "random", "--ratio", "0.5"], "needs --embeddings, --clusters or --scores"),
        (["--method", "cluster-furthest", "--ratio", "0.5"], "needs --embeddings (with --k)"),
        (["--scores", "{tmp}/nan.npy", "--method", "el2n", "--ratio", "0.5"], "1-D array"),
        ([*EMB, "--scores", "{tmp}/short.npy", "--method", "el2n", "--ratio", "0.5"], "N=120"),
        ([*EMB, "--clusters", "{tmp}/c.parquet", *CLUSTER, "--ratio", "0.5"], "not allowed with"),
        ([*EMB, *CLUSTER, "--ratio", "0.5", "--balanced-order", "mid"], "invalid choice: 'mid'"),
        ([*EMB, *CLUSTER, "--ratio", "0.5", "--device", "tpu"], "bad device 'tpu'"),
        ([*EMB, *CLUSTER, "--ratio", "0.5", "--init", "pp"], "argument --init: invalid choice"),
        ([*EMB, "--method", "random", "--ratio", "0.5", "--seed", "-3"], "seed must be a non-neg"),
        ([*EMB, *CLUSTER, "--ratio", "0.5", "--iterations", "0"], "at least 1, got 0"),
        ([*EMB, "--method", "random", "--ratio", "0.995"], "keeps none of the 120 samples"),
        ([*EMB, "--method", "cluster-mid", "--k", "120", "--ratio", "0.5"], "fewer clusters"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(user_files, capsys, args, message):
    bad_files(user_files)
    out = user_files / "bad.parquet"
    argv = ["select", *(a.format(tmp=user_files) for a in args), "--out", str(out)]
    code, stdout, stderr = run(argv, capsys)
    if message is None:
        assert code == 0, stderr
        return
    assert code == 2
    assert stderr.startswith("diffprune: error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert stdout == "" and not out.exists()


def test_unwritable_output_is_one_line(user_files, capsys):
    (user_files / "file").write_text("")
    argv = ["select", "--scores", user_files / "scores.npy", "--method", "el2n", "--ratio", 0.5]
    code, _, stderr = run([*argv, "--out", user_files / "file" / "m.parquet"], capsys)
    assert code == 2 and stderr.startswith("diffprune: error: ") and stderr.count("\n") == 1


def test_usage_errors_are_one_line(capsys):
    for argv in ([], ["select", "--method", "random"], ["prune"]):
        code, _, stderr = run(argv, capsys)
        assert code == 2 and stderr.startswith("diffprune: error: ")
        assert stderr.count("\n") == 1, stderr


def test_help_states_the_semantics(capsys):
    code, stdout, _ = run(["select", "--help"], capsys)
    assert code == 0
    text = " ".join(stdout.split())
    assert "ratio p (--ratio) is the fraction of samples REMOVED, 0 <= p < 1; 1-p is kept" in text
    assert "keep (bool: True = KEPT for training, False = removed)" in text
    for phrase in (*CLUSTER_METHODS, "random", "<score>-inverse", "<score>-mid", "HIGHEST"):
        assert phrase in text
    for column in ("sample_id (int64)", "score (float64", "cluster (int64", "distance (float64"):
        assert column in text


def test_python_dash_m_runs_the_cli(user_files):
    out = user_files / "m.parquet"
    argv = ["select", "--scores", str(user_files / "scores.npy"), "--method", "moso"]
    result = subprocess.run(
        [sys.executable, "-m", "diffprune", *argv, "--ratio", "0.5", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert pd.read_parquet(out)["keep"].sum() == 60
    result = subprocess.run(
        [sys.executable, "-m", "diffprune", *argv, "--ratio", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "diffprune: error: ratio must be in [0, 1) (the fraction of samples REMOVED), got 1.0"
    ]
