import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from script_helpers import fake_snakemake, files, run_script

from diffprune import cluster, io
from diffprune.cluster import (
    _assign,
    _exact_sq,
    clusters_frame,
    kmeans,
    validate_embeddings,
    validate_k,
)
from diffprune.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent

CENTRES = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])


def blobs(n_per: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, 1.0, size=(n_per, 2)) for c in CENTRES])
    return x, np.repeat(np.arange(len(CENTRES)), n_per)


def test_recovers_blobs_with_euclidean_distances():
    x, labels = blobs()
    result = kmeans(x, k=3, seed=0, device="cpu")
    assert result.centroids.shape == (3, 2) and result.centroids.dtype == np.float32
    assert result.assignments.dtype == np.int64 and result.distances.dtype == np.float32
    # each true blob maps to exactly one cluster, and the mapping is a bijection
    mapping = {int(c): int(result.assignments[labels == c][0]) for c in range(3)}
    assert sorted(mapping.values()) == [0, 1, 2]
    np.testing.assert_array_equal(result.assignments, [mapping[c] for c in labels])
    # distances are plain (not squared) Euclidean distances to the own centroid
    own = result.centroids[result.assignments].astype(np.float64)
    np.testing.assert_allclose(result.distances, np.linalg.norm(x - own, axis=1), atol=1e-5)
    assert 0.5 < np.median(result.distances) < 2.0  # squared would be ~1.4x larger on average


@pytest.mark.parametrize("seed", range(8))
def test_kmeans_pp_init_finds_separated_blobs(seed):
    # init="random" merges two of these blobs for seeds 0 and 4 of 0..7
    x, labels = blobs(n_per=300)
    assignments = kmeans(x, k=3, seed=seed, iterations=10, device="cpu").assignments
    assert all(len(np.unique(assignments[labels == c])) == 1 for c in range(3))


def test_uses_all_points_not_a_subsample():
    # faiss subsamples to 256 points per centroid by default; then the centroids would be means
    # of a subsample and miss the full cluster means by ~1/sqrt(256) standard deviations (~0.06;
    # 0.24 measured on these data). faiss sums in float32: ~0.003 off even on all points.
    x, _ = blobs(n_per=3000, seed=1)
    result = kmeans(x, k=3, seed=0, iterations=20, device="cpu")
    for c in range(3):
        members = x[result.assignments == c]
        np.testing.assert_allclose(result.centroids[c], members.mean(axis=0), atol=0.02)


def test_no_empty_cluster_with_duplicate_points():
    # 5 distinct points, repeated: faiss alone leaves clusters empty when k > 5
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(5, 4))
    x = np.repeat(distinct, [50, 30, 10, 5, 1], axis=0)
    for k in (5, 6, 8, 96):
        result = kmeans(x, k=k, seed=1, device="cpu")
        counts = np.bincount(result.assignments, minlength=k)
        assert (counts >= 1).all(), (k, counts)
        assert counts.sum() == len(x)
        own = result.centroids[result.assignments]
        np.testing.assert_allclose(result.distances, np.linalg.norm(x - own, axis=1), atol=1e-5)


def test_k_equals_n_gives_singletons():
    x = np.random.default_rng(2).normal(size=(7, 3))
    result = kmeans(x, k=7, seed=0, device="cpu")
    assert sorted(result.assignments.tolist()) == list(range(7))
    np.testing.assert_allclose(result.distances, 0.0, atol=1e-6)


def test_seeded_and_deterministic():
    x = np.random.default_rng(3).normal(size=(500, 8))
    a = kmeans(x, k=10, seed=5, device="cpu")
    b = kmeans(x, k=10, seed=5, device="cpu")
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_array_equal(a.distances, b.distances)


def test_clusters_frame():
    x, _ = blobs(n_per=20)
    result = kmeans(x, k=3, seed=0, device="cpu")
    frame = clusters_frame(result)
    assert list(frame.columns) == ["sample_id", "cluster", "distance"]
    assert frame.dtypes.to_dict() == {
        "sample_id": np.dtype("int64"),
        "cluster": np.dtype("int64"),
        "distance": np.dtype("float32"),
    }
    pd.testing.assert_series_equal(frame["sample_id"], pd.Series(np.arange(60), name="sample_id"))
    np.testing.assert_array_equal(frame["cluster"], result.assignments)


@pytest.mark.parametrize(
    ("embeddings", "match"),
    [
        (np.zeros(5), r"2-D array \(N, D\), got shape \(5,\)"),
        (np.zeros((2, 3, 4)), r"got shape \(2, 3, 4\)"),
        (np.zeros((0, 3)), r"non-empty"),
        (np.array([["a", "b"]]), r"real numbers"),
        (np.array([[1.0, np.nan], [0.0, 0.0], [np.inf, 1.0]]), r"NaN or inf in 2 of 3 rows"),
        (np.array([[1e300, 0.0]]), r"NaN or inf"),  # beyond float32 range
    ],
)
def test_bad_embeddings(embeddings, match):
    with pytest.raises(DataError, match=match):
        kmeans(embeddings, k=1, device="cpu")


def test_validate_embeddings_converts_to_float32():
    out = validate_embeddings(np.arange(6, dtype=np.int64).reshape(3, 2))
    assert out.dtype == np.float32 and out.flags.c_contiguous


@pytest.mark.parametrize(
    ("k", "match"),
    [
        (11, r"k = 11 is larger than the number of samples \(10\); allowed: 1..10"),
        (0, "at least 1"),
        (2.5, "integer"),
    ],
)
def test_bad_k(k, match):
    with pytest.raises(ConfigError, match=match):
        validate_k(k, 10)
    with pytest.raises(ConfigError, match=match):
        kmeans(np.zeros((10, 2)), k=k, device="cpu")


def test_k_out_of_range_names_its_key():
    with pytest.raises(ConfigError, match=r"^cluster\.k = 11 is larger .* allowed: 1\.\.10$"):
        kmeans(np.zeros((10, 2)), k=11, device="cpu", key="cluster.k")


def test_bad_init():
    with pytest.raises(
        ConfigError, match=r"unknown k-means init 'kmeans\+\+'; allowed: k-means\+\+"
    ):
        kmeans(np.zeros((10, 2)), k=2, init="kmeans++", device="cpu")


def test_bad_backend():
    with pytest.raises(ConfigError, match=r"unknown k-means backend 'gpu'; allowed: auto, float64"):
        kmeans(np.zeros((10, 2)), k=2, backend="gpu", device="cpu")


# --------------------------------------------------------------- the same clusters on any CPU
def overlapping(n: int = 2000, dim: int = 64, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    """Non-negative, overlapping groups (like pooled CNN features): many points near a boundary;
    `offset` shifts them away from the origin, where float32 distances cancel more."""
    rng = np.random.default_rng(seed)
    centres = 1 + 0.08 * rng.standard_normal((10, dim))
    x = centres[rng.integers(0, 10, n)] + 0.5 * rng.standard_normal((n, dim))
    return (offset + np.abs(x)).astype(np.float32)


def test_assign_is_the_exact_nearest_centroid_lowest_id_on_ties():
    rng = np.random.default_rng(0)
    # far from the origin, BLAS's |x|^2 - 2 x.c + |c|^2 cancels catastrophically
    centroids = 1e6 + rng.standard_normal((5, 8)) * 1e-3
    x = 1e6 + rng.standard_normal((500, 8)) * 1e-3
    # and exact ties: rows equidistant from centroids 1 and 3 (their midpoint)
    x[:20] = (centroids[1] + centroids[3]) / 2
    exact = _exact_sq(x, centroids)
    expected = exact.argmin(axis=1)  # first minimum: lowest id
    blas = (x**2).sum(1)[:, None] - 2 * x @ centroids.T + (centroids**2).sum(1)[None]
    assert (blas.argmin(axis=1) != expected).any()  # the case the exact re-ranking exists for
    np.testing.assert_array_equal(_assign(x, centroids), expected)
    assert set(expected[:20]) <= {1, 3}
    exact_ties = exact[:20, 1] == exact[:20, 3]
    assert (expected[:20][exact_ties] == 1).all()


def test_assign_matches_the_exact_argmin_on_overlapping_data():
    x = overlapping()
    centroids = x[:10].astype(np.float64)
    np.testing.assert_array_equal(_assign(x, centroids), _exact_sq(x, centroids).argmin(axis=1))


_PROBE = """
import sys, numpy as np, faiss
from diffprune import io
from diffprune.cluster import clusters_frame, kmeans
x = np.load(sys.argv[1])
for init in ("k-means++", "afk-mc2"):
    result = kmeans(x, k=10, seed=3, init=init, backend="float64")
    io.save_parquet(f"{sys.argv[2]}-{init}.parquet", clusters_frame(result))
    np.save(f"{sys.argv[2]}-{init}-centroids.npy", result.centroids)
np.save(f"{sys.argv[2]}-faiss-knn.npy", faiss.knn(x, x[:10], 2)[0])
"""


def _kernel_variants() -> list[dict[str, str]]:
    """Environments that change faiss's SIMD level, OpenBLAS's kernels, numpy's SIMD, threads."""
    from numpy._core._multiarray_umath import __cpu_dispatch__

    generic = {
        "FAISS_SIMD_LEVEL": "NONE",
        "NPY_DISABLE_CPU_FEATURES": " ".join(__cpu_dispatch__),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    wide = {"FAISS_SIMD_LEVEL": "AVX2", "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    if platform.machine() in ("x86_64", "AMD64"):
        generic["OPENBLAS_CORETYPE"] = "Prescott"  # SSE3 kernels: any x86-64 CPU runs them
        if "avx2" in cluster.machine()["cpu_simd"]:
            wide["OPENBLAS_CORETYPE"] = "Haswell"
    return [{}, generic, wide]


def test_float64_clusters_are_byte_identical_across_cpu_kernels(tmp_path):
    """A fresh process per environment, each with other kernels: the same clusters.parquet bytes
    (and centroids), while faiss's float32 distances change between them. (On the 2-core AMD EPYC
    dev machine faiss's own k-means gave different clusters in each of the three.)"""
    np.save(tmp_path / "x.npy", overlapping(offset=30.0))
    outputs = []
    for i, variant in enumerate(_kernel_variants()):
        env = {**os.environ, "PYTHONPATH": str(REPO), **variant}
        out = tmp_path / f"v{i}"
        subprocess.run(
            [sys.executable, "-c", _PROBE, str(tmp_path / "x.npy"), str(out)],
            env=env,
            check=True,
            cwd=REPO,
        )
        outputs.append(out)

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for suffix in ("k-means++.parquet", "afk-mc2.parquet", "k-means++-centroids.npy"):
        digests = {digest(Path(f"{out}-{suffix}")) for out in outputs}
        assert len(digests) == 1, (suffix, digests)
    knn = {digest(Path(f"{out}-faiss-knn.npy")) for out in outputs}
    assert len(knn) > 1, "the environments did not change faiss's float32 kernels"


# ----------------------------------------------------------------------------- the two paths
def test_auto_backend_is_float64_up_to_the_work_limit_then_faiss(monkeypatch):
    x = overlapping(n=500, dim=16)
    assert kmeans(x, k=4, device="cpu").backend == "float64"
    monkeypatch.setattr(cluster, "EXACT_MAX_WORK", 500 * 4 * 16 - 1)
    result = kmeans(x, k=4, device="cpu")
    assert result.backend == "faiss-cpu" and result.iterations == 50
    # faiss's centroids, but the exact nearest centroid and distance for them
    centroids = result.centroids.astype(np.float64)
    exact = _exact_sq(x, centroids)
    np.testing.assert_array_equal(result.assignments, exact.argmin(axis=1))
    np.testing.assert_array_equal(result.distances, np.sqrt(exact.min(axis=1)).astype(np.float32))


def test_float64_lloyd_stops_at_a_fixed_point():
    x = overlapping(n=1000, dim=16)
    result = kmeans(x, k=5, iterations=100, device="cpu")
    assert result.iterations < 100
    # one more Lloyd step changes nothing: every centroid is its cluster's mean
    for c in range(5):
        members = x[result.assignments == c].astype(np.float64)
        np.testing.assert_array_equal(result.centroids[c], members.mean(0).astype(np.float32))


@pytest.mark.parametrize("seed", range(8))
def test_afkmc2_init_finds_separated_blobs(seed):
    x, labels = blobs(n_per=300)
    assignments = kmeans(x, k=3, seed=seed, iterations=10, init="afk-mc2").assignments
    assert all(len(np.unique(assignments[labels == c])) == 1 for c in range(3))


@pytest.mark.parametrize("init", ["k-means++", "afk-mc2", "random"])
def test_inits_start_differently_and_are_seeded(init):
    x = overlapping(n=600, dim=8)
    first = kmeans(x, k=6, seed=1, iterations=1, init=init)
    again = kmeans(x, k=6, seed=1, iterations=1, init=init)
    np.testing.assert_array_equal(first.centroids, again.centroids)
    others = [kmeans(x, k=6, seed=1, iterations=1, init=i).centroids for i in cluster.INITS]
    assert sum(np.array_equal(first.centroids, c) for c in others) == 1


@pytest.mark.parametrize("init", ["afk-mc2", "k-means++"])
def test_cluster_script_records_init_backend_and_machine(tmp_path, init):
    x, _ = blobs(n_per=20)
    io.save_npy(tmp_path / "embeddings.npy", x.astype(np.float32))
    io.save_json(tmp_path / "embeddings.json", {"model": "blobs"})
    cfg = {"k": 3, "iterations": 20, "seed": 4, "init": init, "device": "cpu"}
    smk = fake_snakemake(
        input=files(
            embeddings=tmp_path / "embeddings.npy", embeddings_meta=tmp_path / "embeddings.json"
        ),
        output=files(
            clusters=tmp_path / "clusters.parquet",
            centroids=tmp_path / "centroids.npy",
            meta=tmp_path / "clusters.json",
        ),
        params={"cluster": cfg},
        log=tmp_path / "cluster.log",
    )
    run_script("cluster", smk)
    meta = io.load_json(tmp_path / "clusters.json")
    assert meta["init"] == init and meta["backend"] == "float64"
    assert 1 <= meta["iterations_run"] <= 20
    assert meta["machine"]["faiss_simd"] and meta["machine"]["cpu"]
    expected = kmeans(x, k=3, iterations=20, seed=4, init=init)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "clusters.parquet"), clusters_frame(expected)
    )


def test_bench_kmeans_rows_have_the_table_columns():
    spec = importlib.util.spec_from_file_location("bench_kmeans", REPO / "benchmarks" / "kmeans.py")
    rows_spec = importlib.util.spec_from_file_location(
        "bench_rows", REPO / "benchmarks" / "rows.py"
    )
    rows_module = importlib.util.module_from_spec(rows_spec)
    rows_spec.loader.exec_module(rows_module)
    ROW_KEYS = rows_module.ROW_KEYS
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.bench_kmeans(
        n=3000,
        dim=16,
        k=20,
        iterations=1,
        default_n=300,
        default_dim=8,
        default_k=3,
        objective_size=(2000, 10),
    )
    assert len(rows) == 4
    for row in rows:
        assert set(row) == set(ROW_KEYS)
        assert row["value"] > 0 and row["baseline_value"] > 0
        assert row["ratio"] == pytest.approx(row["baseline_value"] / row["value"])
