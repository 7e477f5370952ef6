import numpy as np
import pandas as pd
import pytest

from diffprune.cluster import clusters_frame, kmeans
from diffprune.errors import ConfigError, DataError
from diffprune.io import save_parquet
from diffprune.names import CLUSTER_METHODS, METHODS, needs
from diffprune.select import (
    KEEPS,
    describe,
    direction,
    full_manifest,
    manifest_summary,
    select,
)

# Cluster sizes with missing label ids (2 and 4), a singleton and one large cluster.
SIZES = {0: 10, 1: 7, 3: 1, 5: 4, 6: 100}
N = sum(SIZES.values())  # 122
# floor(n_c * (1 - p)) per cluster, worked out by hand.
KEPT_PER_CLUSTER = {
    0.0: {0: 10, 1: 7, 3: 1, 5: 4, 6: 100},
    0.25: {0: 7, 1: 5, 3: 0, 5: 3, 6: 75},
    0.5: {0: 5, 1: 3, 3: 0, 5: 2, 6: 50},
    0.9: {0: 1, 1: 0, 3: 0, 5: 0, 6: 10},  # 10 * 0.1 is 1 exactly, not 0.999...
    0.99: {0: 0, 1: 0, 3: 0, 5: 0, 6: 1},
}
KEPT_TOTAL = {0.0: 122, 0.25: 91, 0.5: 61, 0.9: 12, 0.99: 1}  # floor(122 * (1 - p))


def make_clusters(sizes=SIZES, seed=0) -> pd.DataFrame:
    """Clusters table whose members are scattered over the sample ids (not contiguous), with
    distinct distances, rows in shuffled order."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    labels = rng.permutation(labels)
    frame = pd.DataFrame(
        {
            "sample_id": np.arange(len(labels), dtype=np.int64),
            "cluster": labels.astype(np.int64),
            "distance": rng.permutation(len(labels)).astype(np.float32) / 10,
        }
    )
    return frame.sample(frac=1.0, random_state=1)


def kept_per_cluster(manifest: pd.DataFrame) -> dict[int, int]:
    return {int(c): int(k) for c, k in manifest.groupby("cluster")["keep"].sum().items()}


def ranked(manifest: pd.DataFrame, cluster: int) -> pd.DataFrame:
    """One cluster's rows, nearest first."""
    rows = manifest[manifest["cluster"] == cluster]
    return rows.sort_values(["distance", "sample_id"], kind="stable")


@pytest.mark.parametrize("ratio", sorted(KEPT_PER_CLUSTER))
@pytest.mark.parametrize(
    "method", ["cluster-furthest", "cluster-nearest", "cluster-mid", "cluster-random"]
)
def test_cluster_rules_keep_floor_per_cluster(method, ratio):
    manifest = select(method, ratio, clusters=make_clusters(), seed=3)
    assert kept_per_cluster(manifest) == KEPT_PER_CLUSTER[ratio]


@pytest.mark.parametrize("ratio", sorted(KEPT_TOTAL))
def test_random_keeps_floor_of_all(ratio):
    assert select("random", ratio, n=N, seed=4)["keep"].sum() == KEPT_TOTAL[ratio]
    assert (
        select("random", ratio, clusters=make_clusters(), seed=4)["keep"].sum()
        == (KEPT_TOTAL[ratio])
    )


def test_float_rounding_does_not_lose_a_sample():
    # in floats 10 * (1 - 0.9) = 0.9999999999999998
    assert select("random", 0.9, n=10)["keep"].sum() == 1
    assert select("el2n", 0.9, scores=np.arange(10.0))["keep"].sum() == 1


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_furthest_nearest_mid_keep_the_right_ends(ratio):
    clusters = make_clusters()
    for c in SIZES:
        n_c, keep = SIZES[c], KEPT_PER_CLUSTER[ratio][c]
        removed = n_c - keep
        order = {
            "cluster-nearest": slice(0, keep),
            "cluster-furthest": slice(n_c - keep, n_c),
            "cluster-mid": slice(removed // 2, removed // 2 + keep),
        }
        for method, band in order.items():
            rows = ranked(select(method, ratio, clusters=clusters), c)
            expected = np.zeros(n_c, dtype=bool)
            expected[band] = True
            np.testing.assert_array_equal(rows["keep"], expected, err_msg=f"{method} {c}")


def test_mid_removes_the_extra_sample_from_the_far_end():
    # one cluster, distances 0..9; p=0.25 keeps 7, removes 3: 1 nearest and 2 furthest
    clusters = pd.DataFrame(
        {"sample_id": np.arange(10), "cluster": 0, "distance": np.arange(10.0)[::-1]}
    )
    manifest = select("cluster-mid", 0.25, clusters=clusters)
    assert sorted(manifest.loc[manifest["keep"], "distance"]) == [1, 2, 3, 4, 5, 6, 7]
    manifest = select("cluster-mid", 0.5, clusters=clusters)  # removes 2 nearest, 3 furthest
    assert sorted(manifest.loc[manifest["keep"], "distance"]) == [2, 3, 4, 5, 6]


def test_blobs_nearest_keeps_cores_furthest_keeps_rims():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [30.0, 0.0], [0.0, 30.0]])
    x = np.concatenate([rng.normal(c, 1.0, size=(300, 2)) for c in centres])
    true_radius = np.linalg.norm(x - np.repeat(centres, 300, axis=0), axis=1)
    clusters = clusters_frame(kmeans(x, k=3, seed=0, device="cpu"))
    near = select("cluster-nearest", 0.5, clusters=clusters)["keep"].to_numpy()
    far = select("cluster-furthest", 0.5, clusters=clusters)["keep"].to_numpy()
    assert near.sum() == far.sum() == 450 and not (near & far).any()
    # radius from the true centre: mean 1.25 overall, ~0.73 for the inner and ~1.77 for the
    # outer half of a 2-D standard normal
    assert true_radius[near].mean() < 0.85 and true_radius[far].mean() > 1.65
    for c in range(3):
        in_c = clusters["cluster"].to_numpy() == c
        dist = clusters["distance"].to_numpy()
        assert dist[in_c & near].max() <= dist[in_c & ~near].min()
        assert dist[in_c & far].min() >= dist[in_c & ~far].max()


@pytest.mark.parametrize(
    ("ratio", "m"),
    # sizes 10, 7, 9 (N=26, k=3): m = min(7, floor(floor(26(1-p)) / 3))
    [(0.0, 7), (0.25, 6), (0.5, 4), (0.85, 1)],
)
def test_balanced_keeps_equal_counts(ratio, m):
    clusters = make_clusters({0: 10, 2: 7, 3: 9})
    manifest = select("cluster-balanced", ratio, clusters=clusters)
    assert kept_per_cluster(manifest) == {0: m, 2: m, 3: m}
    for c, order in [(0, "furthest"), (3, "nearest")]:
        manifest = select("cluster-balanced", ratio, clusters=clusters, balanced_order=order)
        keep = ranked(manifest, c)["keep"].to_numpy()
        expected = np.zeros(len(keep), dtype=bool)
        if order == "furthest":
            expected[len(keep) - m :] = True
        else:
            expected[:m] = True
        np.testing.assert_array_equal(keep, expected)


def test_balanced_at_ratio_zero_is_the_paper_rule():
    # m = the smallest cluster's size (1 here): one sample from each of the 5 clusters
    manifest = select("cluster-balanced", 0.0, clusters=make_clusters())
    assert kept_per_cluster(manifest) == dict.fromkeys(SIZES, 1)


def test_k_equals_n_singleton_clusters():
    clusters = pd.DataFrame({"sample_id": np.arange(6), "cluster": np.arange(6), "distance": 0.0})
    for method in CLUSTER_METHODS:
        assert select(method, 0.0, clusters=clusters)["keep"].all()
        with pytest.raises(ConfigError, match="keeps none of the 6 samples"):  # floor(0.5) = 0
            select(method, 0.5, clusters=clusters)


@pytest.mark.parametrize(
    ("method", "ratio", "match"),
    [
        ("random", 0.95, r"floor\(10 \(1 - 0.95\)\) = 0; allowed: ratio <= 1 - 1/10 = 0.9$"),
        ("el2n", 0.95, r"allowed: ratio <= 1 - 1/10 = 0\.9$"),
        ("cluster-furthest", 0.7, r"in each of its 4 clusters \(the largest has 3\); allowed: "),
        ("cluster-balanced", 0.8, r"m = min\(smallest cluster 1, .* fewer clusters \(k\)$"),
    ],
)
def test_a_selection_that_keeps_nothing_is_an_error_saying_what_would_keep_some(
    method, ratio, match
):
    clusters = make_clusters({0: 3, 1: 3, 2: 3, 3: 1})
    with pytest.raises(ConfigError, match=f"^{method} at ratio {ratio} keeps none of the 10 .*"):
        select(method, ratio, clusters=clusters, scores=np.arange(10.0))
    with pytest.raises(ConfigError, match=match):
        select(method, ratio, clusters=clusters, scores=np.arange(10.0))


def test_cluster_random_is_seeded_and_stays_in_clusters():
    clusters = make_clusters()
    a = select("cluster-random", 0.5, clusters=clusters, seed=0)
    b = select("cluster-random", 0.5, clusters=clusters, seed=0)
    c = select("cluster-random", 0.5, clusters=clusters, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert not a["keep"].equals(c["keep"])
    assert kept_per_cluster(c) == KEPT_PER_CLUSTER[0.5]


def test_random_is_uniform():
    freq = np.mean([select("random", 0.5, n=10, seed=s)["keep"] for s in range(400)], axis=0)
    np.testing.assert_allclose(freq, 0.5, atol=0.1)  # 4 standard errors


@pytest.mark.parametrize("score", ["el2n", "grand", "forgetting", "moso"])
def test_score_orientation(score):
    rng = np.random.default_rng(0)
    scores = rng.permutation(20).astype(np.float64)  # sample i has score scores[i]
    high = select(score, 0.5, scores=scores)
    low = select(f"{score}-inverse", 0.5, scores=scores)
    mid = select(f"{score}-mid", 0.5, scores=scores)
    assert sorted(scores[high["keep"]]) == list(range(10, 20))
    assert sorted(scores[low["keep"]]) == list(range(10))
    assert sorted(scores[mid["keep"]]) == list(range(5, 15))  # 5 lowest and 5 highest removed
    np.testing.assert_array_equal(high["score"], scores)
    # p=0.25 removes 5: mid drops 2 lowest and 3 highest
    assert sorted(scores[select(f"{score}-mid", 0.25, scores=scores)["keep"]]) == list(range(2, 17))


def test_forgetting_selects_by_score_not_by_index():
    # scores fall with the index: the highest scores belong to the LOWEST sample ids
    scores = np.linspace(1.0, 0.0, 20)
    kept = select("forgetting", 0.75, scores=scores)
    assert kept.loc[kept["keep"], "sample_id"].tolist() == [0, 1, 2, 3, 4]
    kept = select("forgetting-inverse", 0.75, scores=scores)
    assert kept.loc[kept["keep"], "sample_id"].tolist() == [15, 16, 17, 18, 19]


def test_ties_broken_by_sample_id():
    scores = np.array([1.0, 2.0, 2.0, 2.0, 0.0, 2.0])
    kept = select("el2n", 0.5, scores=scores)  # keeps 3 of the four 2.0s: the lowest ids
    assert kept.loc[kept["keep"], "sample_id"].tolist() == [1, 2, 3]
    clusters = pd.DataFrame({"sample_id": np.arange(6), "cluster": 0, "distance": 1.0})
    for method in ("cluster-furthest", "cluster-nearest"):
        kept = select(method, 0.5, clusters=clusters)
        assert kept.loc[kept["keep"], "sample_id"].tolist() == [0, 1, 2]


def test_scores_align_with_sorted_sample_ids_of_clusters():
    clusters = make_clusters({0: 6, 1: 4})
    clusters["sample_id"] += 100  # ids 100..109, rows shuffled
    scores = np.arange(10.0)  # score of sample 100 + i is i
    manifest = select("el2n", 0.5, clusters=clusters, scores=scores)
    assert manifest["sample_id"].tolist() == list(range(100, 110))
    np.testing.assert_array_equal(manifest["score"], scores)
    assert manifest.loc[manifest["keep"], "sample_id"].tolist() == [105, 106, 107, 108, 109]
    expected = clusters.sort_values("sample_id")
    np.testing.assert_array_equal(manifest["cluster"], expected["cluster"])


def test_manifest_format():
    manifest = select("cluster-nearest", 0.5, clusters=make_clusters())
    assert list(manifest.columns) == ["sample_id", "keep", "score", "cluster", "distance"]
    assert manifest.dtypes.astype(str).tolist() == ["int64", "bool", "float64", "int64", "float64"]
    assert manifest["sample_id"].tolist() == list(range(N))
    assert manifest["score"].isna().all()
    only_scores = select("el2n", 0.5, scores=np.ones(4))
    assert (only_scores["cluster"] == -1).all() and only_scores["distance"].isna().all()
    full = full_manifest(5)
    assert full["keep"].all() and full["sample_id"].tolist() == list(range(5))
    assert full.dtypes.astype(str).tolist() == ["int64", "bool", "float64", "int64", "float64"]


@pytest.mark.parametrize("method", METHODS)
def test_byte_identical_manifests(method, tmp_path):
    rng = np.random.default_rng(0)
    inputs = {"clusters": make_clusters(), "scores": rng.normal(size=N)}
    inputs["embeddings"] = rng.normal(size=(N, 8)).astype(np.float32)
    for name in ("a", "b"):
        save_parquet(tmp_path / f"{name}.parquet", select(method, 0.5, seed=7, **inputs))
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_manifest_summary():
    summary = manifest_summary(select("cluster-furthest", 0.5, clusters=make_clusters()))
    assert summary == {
        "n_total": 122,
        "n_kept": 60,
        "kept_fraction": 60 / 122,
        "kept_per_cluster": {"0": 5, "1": 3, "3": 0, "5": 2, "6": 50},
    }
    assert manifest_summary(full_manifest(4))["kept_per_cluster"] == {}


def test_needs_and_direction():
    assert len(METHODS) == 1 + 5 + 4 * 3 + 1
    assert needs("random") == set()
    assert needs("cluster-mid") == {"clusters"}
    assert needs("forgetting-inverse") == {"scores:forgetting"}
    assert needs("moso-mid") == {"scores:moso"}
    assert needs("semdedup") == {"clusters", "embeddings"}
    assert direction("cluster-furthest") == "furthest"
    assert direction("cluster-balanced", balanced_order="nearest") == "nearest"
    assert direction("el2n") == "highest" and direction("el2n-inverse") == "lowest"
    assert direction("grand-mid") == direction("cluster-mid") == "middle"
    assert "HIGHEST" in describe("forgetting") and "LOWEST" in describe("moso-inverse")
    assert describe("cluster-nearest") == KEEPS["cluster-nearest"]


def bad_clusters(**changes):
    frame = make_clusters({0: 3, 1: 3})
    for column, value in changes.items():
        if value is None:
            frame = frame.drop(columns=column)
        else:
            frame[column] = value
    return frame


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "furthest"}, ConfigError, r"unknown selection method 'furthest'; allowed: "),
        ({"ratio": 1.0}, ConfigError, r"ratio must be in \[0, 1\).*REMOVED.*got 1\.0"),
        ({"ratio": -0.1}, ConfigError, r"got -0\.1"),
        ({"ratio": float("nan")}, ConfigError, r"ratio must be in \[0, 1\)"),
        ({"ratio": "half"}, ConfigError, r"ratio must be a number"),
        ({"balanced_order": "middle"}, ConfigError, r"balanced_order must be one of"),
        ({"method": "random", "seed": -1}, ConfigError, r"seed must be a non-negative integer"),
        ({"clusters": None}, ConfigError, r"needs clusters"),
        ({"method": "el2n", "clusters": None}, ConfigError, r"needs scores \(scores:el2n\)"),
        ({"method": "random", "clusters": None}, ConfigError, r"number of samples"),
        ({"n": 7}, DataError, r"clusters table has 6 rows but there are 7 samples"),
        ({"clusters": bad_clusters(distance=None)}, DataError, r"lacks columns \['distance'\]"),
        ({"clusters": bad_clusters(sample_id=0)}, DataError, r"duplicate sample_id"),
        ({"clusters": bad_clusters(cluster=-1)}, DataError, r"negative"),
        ({"clusters": bad_clusters(distance=np.nan)}, DataError, r"finite"),
        ({"clusters": bad_clusters(cluster=0.5)}, DataError, r"'cluster' must be integer"),
        ({"scores": np.ones(5)}, DataError, r"1-D array of length N=6 .* got shape \(5,\)"),
        ({"scores": np.ones((6, 1))}, DataError, r"got shape \(6, 1\)"),
        ({"scores": np.array([1, 2, np.nan, 4, 5, np.inf])}, DataError, r"2 NaN or inf"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"method": "cluster-furthest", "ratio": 0.5, "clusters": make_clusters({0: 3, 1: 3})}
    args.update(kwargs)
    with pytest.raises(error, match=match) as info:
        select(args.pop("method"), args.pop("ratio"), **args)
    assert "\n" not in str(info.value)


def test_unknown_method_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as info:
        needs("cluster-far")
    assert all(method in str(info.value) for method in METHODS)


def test_score_ties_are_broken_by_seed_not_by_sample_index():
    # forgetting scores take few values: all tied here. Keeping the lowest ids would be the
    # reference code's select-by-index bug in disguise.
    scores = np.zeros(1000)
    kept = [select("forgetting", 0.5, scores=scores, seed=s)["keep"].to_numpy() for s in (0, 1)]
    ids = np.arange(1000)
    assert abs(ids[kept[0]].mean() - 499.5) < 60  # spread over the index range, not 0..499
    assert not (kept[0] == kept[1]).all()
    assert (kept[0] == select("forgetting", 0.5, scores=scores, seed=0)["keep"].to_numpy()).all()
