import numpy as np
import pandas as pd
import pytest

from diffprune.cluster import clusters_frame, kmeans, validate_embeddings, validate_k
from diffprune.errors import ConfigError, DataError

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
        (11, r"k=11 is larger than the number of samples \(10\)"),
        (0, "at least 1"),
        (2.5, "integer"),
    ],
)
def test_bad_k(k, match):
    with pytest.raises(ConfigError, match=match):
        validate_k(k, 10)
    with pytest.raises(ConfigError, match=match):
        kmeans(np.zeros((10, 2)), k=k, device="cpu")


def test_bad_init():
    with pytest.raises(
        ConfigError, match=r"unknown k-means init 'kmeans\+\+'; allowed: k-means\+\+"
    ):
        kmeans(np.zeros((10, 2)), k=2, init="kmeans++", device="cpu")
