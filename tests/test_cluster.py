import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from script_helpers import fake_snakemake, files, run_script

from diffprune import cluster, io
from diffprune.cluster import (
    _assign,
    _assign_filled,
    _exact_sq,
    _own_sq,
    assign_chunked,
    clusters_frame,
    kmeans,
    validate_embeddings,
    validate_fit_size,
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
    cfg = {"k": 3, "iterations": 20, "seed": 4, "init": init, "device": "cpu"}
    meta = cluster_script(tmp_path, x, cfg)
    assert meta["init"] == init and meta["backend"] == "float64"
    assert meta["fit_points"] == 60 and meta["fit_on_all_points"] is True
    assert 1 <= meta["iterations_run"] <= 20
    assert meta["machine"]["faiss_simd"] and meta["machine"]["cpu"]
    expected = kmeans(x, k=3, iterations=20, seed=4, init=init)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "clusters.parquet"), clusters_frame(expected)
    )


def bench_module(name: str):
    """benchmarks/<name>.py imported by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", REPO / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_kmeans_rows_have_the_table_columns():
    ROW_KEYS = bench_module("rows").ROW_KEYS
    bench = bench_module("kmeans")
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


# --------------------------------------------------------------- cluster.fit_size: beyond memory
# SHA-256 of centroids, assignments and distances from kmeans(overlapping(), k=8, seed=1) at
# commit 86e886c, before fit_size existed: fit_size null must keep every byte.
BEFORE_FIT_SIZE = {
    "k-means++": "d81dbdfc529011e6d3bbe8e2dc211c73a55aae82590a8db8c5416d9048ee729b",
    "afk-mc2": "769948a6d9376c8d8c1051363eedf51e5c80b2752a548d396229ddac675bfc4e",
}


def clustering_digest(result: cluster.Clustering) -> str:
    digest = hashlib.sha256()
    for array in (result.centroids, result.assignments, result.distances):
        digest.update(array.tobytes())
    return digest.hexdigest()


def same_bytes(a: cluster.Clustering, b: cluster.Clustering) -> bool:
    return clustering_digest(a) == clustering_digest(b)


def save_memmap(path: Path, x: np.ndarray) -> np.memmap:
    np.save(path, x)
    return np.load(path, mmap_mode="r")


@pytest.mark.parametrize("init", sorted(BEFORE_FIT_SIZE))
def test_fit_size_null_keeps_the_clusters_of_before_and_n_gives_the_same(init, tmp_path):
    x = overlapping()
    result = kmeans(x, k=8, seed=1, init=init, device="cpu")
    assert clustering_digest(result) == BEFORE_FIT_SIZE[init]
    assert result.fit_points == len(x)
    # a sample of all N points is all points in order: the same fit, then a chunked assignment
    mapped = save_memmap(tmp_path / "x.npy", x)
    every = kmeans(mapped, k=8, seed=1, init=init, device="cpu", fit_size=len(x), chunk_rows=300)
    assert same_bytes(every, result)


def test_fit_size_sample_is_seeded_and_assigns_every_point(tmp_path):
    x = overlapping()
    mapped = save_memmap(tmp_path / "x.npy", x)
    first = kmeans(mapped, k=8, seed=1, device="cpu", fit_size=400)
    again = kmeans(mapped, k=8, seed=1, device="cpu", fit_size=400, chunk_rows=123)
    other = kmeans(mapped, k=8, seed=2, device="cpu", fit_size=400)
    assert same_bytes(first, again) and not same_bytes(first, other)
    assert first.fit_points == 400 and len(first.assignments) == len(x)
    assert not same_bytes(first, kmeans(x, k=8, seed=1, device="cpu"))  # fitted on fewer points
    centroids = first.centroids.astype(np.float64)
    np.testing.assert_array_equal(first.assignments, _exact_sq(x, centroids).argmin(axis=1))


@pytest.mark.parametrize("empty", [False, True])
def test_chunked_assignment_equals_the_in_memory_one(tmp_path, empty):
    x = overlapping(n=3000)
    centroids = kmeans(x[::7], k=6, seed=0, device="cpu").centroids.astype(np.float64)
    if empty:  # a centroid no point is nearest to: filled with the same point both ways
        centroids = np.vstack([centroids, np.full((1, x.shape[1]), 100.0)])
    mapped = save_memmap(tmp_path / "x.npy", x)
    memory_centroids, chunk_centroids = centroids.copy(), centroids.copy()
    expected = _assign_filled(x, memory_centroids)
    expected_sq = _own_sq(x, memory_centroids, expected)
    got, got_sq = assign_chunked(mapped, chunk_centroids, chunk_rows=257)
    assert got.tobytes() == expected.tobytes() and got_sq.tobytes() == expected_sq.tobytes()
    assert chunk_centroids.tobytes() == memory_centroids.tobytes()
    assert (np.bincount(got) > 0).all() and empty == (
        not np.array_equal(chunk_centroids, centroids)
    )


def test_fit_size_memory_is_the_sample_and_one_chunk_not_the_embeddings(tmp_path):
    n, dim = 100_000, 128
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float32, (n, dim))
    rng = np.random.default_rng(0)
    for lo in range(0, n, 10_000):
        mapped[lo : lo + 10_000] = rng.standard_normal((10_000, dim), dtype=np.float32)
    mapped.flush()
    del mapped
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    cap = mapped.nbytes // 8  # 6.4 MB: the (N,) results are 1.6 MB, a chunk of 512 rows 0.5 MB
    tracemalloc.start()
    try:
        result = kmeans(mapped, k=4, seed=0, device="cpu", fit_size=1000, chunk_rows=512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(result.assignments) == n and result.fit_points == 1000
    assert peak < cap, f"peak {peak} bytes for {mapped.nbytes} bytes of embeddings"


@pytest.mark.parametrize("fit_size", [2, 11, 2.5, True, "all"])
def test_bad_fit_size_is_one_line_naming_key_value_and_range(fit_size):
    expected = f"cluster.fit_size = {fit_size!r}: must be null (all 10 points) or an integer in "
    with pytest.raises(ConfigError) as info:
        kmeans(np.zeros((10, 2)), k=3, fit_size=fit_size, fit_key="cluster.fit_size", device="cpu")
    assert str(info.value) == expected + "[k, N] = [3, 10]"
    assert validate_fit_size(None, 3, 10) is None and validate_fit_size(10, 3, 10) == 10


def test_nan_outside_the_fit_sample_names_its_row_in_the_file(tmp_path):
    x = overlapping(n=1000)
    sample_rows = np.sort(np.random.default_rng(0).choice(1000, size=100, replace=False))
    outside = int(np.setdiff1d(np.arange(1000), sample_rows)[-1])
    x[outside, 3] = np.nan
    mapped = save_memmap(tmp_path / "x.npy", x)
    match = rf"NaN or inf in 1 of 100 rows read \(first: row {outside}\)"  # chunk 900..999
    with pytest.raises(DataError, match=match):
        kmeans(mapped, k=4, seed=0, device="cpu", fit_size=100, chunk_rows=300)
    x[outside, 3] = 0
    x[sample_rows[5], 0] = np.inf
    with pytest.raises(DataError, match=rf"\(first: row {sample_rows[5]}\)"):
        kmeans(save_memmap(tmp_path / "y.npy", x), k=4, seed=0, device="cpu", fit_size=100)


def test_cluster_script_records_the_fit_sample(tmp_path):
    x, _ = blobs(n_per=20)
    cfg = {"k": 3, "iterations": 20, "seed": 4, "device": "cpu", "fit_size": 30}
    meta = cluster_script(tmp_path, x, cfg)
    assert meta["fit_points"] == 30 and meta["fit_on_all_points"] is False
    expected = kmeans(x, k=3, iterations=20, seed=4, device="cpu", fit_size=30)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "clusters.parquet"), clusters_frame(expected)
    )


@pytest.mark.parametrize("memory", ["enough", "none"])
def test_bench_fit_size_rows_have_the_table_columns(tmp_path, monkeypatch, memory):
    bench = bench_module("kmeans")
    if memory == "none":  # fitting on all points is skipped: memory rows against the embeddings
        monkeypatch.setattr(bench, "available_memory", lambda: 0)
    rows = bench.bench_fit_size(sizes=(300, 900), dim=8, k=4, iterations=2, scratch=tmp_path)
    assert len(rows) == (6 if memory == "enough" else 3)
    assert "fit_size = 300 (k * 256), 900 x 8, k = 4" in rows[-1]["benchmark"]
    for row in rows:
        assert set(row) == set(bench_module("rows").ROW_KEYS)
        assert row["value"] > 0 and row["ratio"] == pytest.approx(
            row["baseline_value"] / row["value"]
        )
    assert not list(tmp_path.iterdir())  # the scratch data is gone
    assert bench.rows_that_fit(10**7, 384, free_bytes=20 * 2**30, reserve=2**30) == 10**7
    # 9 GiB left after the reserve hold 6,291,456 rows of 384 float32 (1,536 bytes)
    assert bench.rows_that_fit(10**7, 384, free_bytes=10 * 2**30, reserve=2**30) == 6_291_456


def cluster_script(tmp_path, x: np.ndarray, cfg: dict) -> dict:
    """workflow/scripts/cluster.py on embeddings `x` with params cluster = `cfg`: clusters.json."""
    io.save_npy(tmp_path / "embeddings.npy", x.astype(np.float32))
    io.save_json(tmp_path / "embeddings.json", {"model": "blobs"})
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
    return io.load_json(tmp_path / "clusters.json")
