import numpy as np
import pytest

from diffprune.errors import ConfigError
from diffprune.skew import arm_ids, arm_manifest, skewed_ids


def toy_labels(per_class=100, classes=5):
    return np.repeat(np.arange(classes), per_class)


def test_skewed_set_hits_the_requested_shares_exactly():
    labels = toy_labels()
    ids = skewed_ids(labels, minority_classes=[1, 3], minority_share=0.1, size=200, seed=0)
    counts = np.bincount(labels[ids], minlength=5)
    assert len(ids) == 200 and len(np.unique(ids)) == 200
    assert counts.tolist() == [60, 10, 60, 10, 60]
    assert (ids == np.sort(ids)).all()


def test_skewed_set_is_seeded():
    labels = toy_labels()
    a = skewed_ids(labels, minority_classes=[0], minority_share=0.05, size=100, seed=1)
    b = skewed_ids(labels, minority_classes=[0], minority_share=0.05, size=100, seed=1)
    c = skewed_ids(labels, minority_classes=[0], minority_share=0.05, size=100, seed=2)
    assert (a == b).all() and not (a == c).all()


def test_skew_larger_than_a_class_is_a_clear_error():
    with pytest.raises(ConfigError, match="class 0 needs 150 samples but the train store has 100"):
        skewed_ids(toy_labels(), minority_classes=[4], minority_share=0.0, size=600, seed=0)


def blobs(sizes, *, seed=0, dim=8, spread=0.05):
    """Well-separated Gaussian groups: group g sits at 10 * e_g."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centres = np.eye(dim)[labels] * 10
    return (centres + spread * rng.standard_normal((len(labels), dim))).astype(np.float32), labels


def test_cluster_balanced_recovers_equal_group_shares_without_labels():
    embeddings, labels = blobs([400, 300, 40, 30])
    skewed = np.arange(len(labels))
    kept, clusters = arm_ids(
        "cluster-balanced", skewed=skewed, labels=np.full_like(labels, -1),
        embeddings=embeddings, keep=120, k=4, seed=0,
    )  # fmt: skip
    assert np.bincount(labels[kept], minlength=4).tolist() == [30, 30, 30, 30]
    assert clusters is not None and clusters["cluster"].nunique() == 4
    random, _ = arm_ids(
        "random", skewed=skewed, labels=labels, embeddings=embeddings, keep=120, k=4, seed=0
    )
    assert np.bincount(labels[random], minlength=4)[3] < 15  # random keeps the skew


def test_label_balanced_oracle_and_manifest():
    embeddings, labels = blobs([50, 50, 10])
    skewed = np.arange(len(labels))
    kept, _ = arm_ids(
        "label-balanced", skewed=skewed, labels=labels, embeddings=embeddings, keep=60, k=3, seed=0
    )
    assert np.bincount(labels[kept]).tolist() == [20, 20, 10]
    manifest = arm_manifest(200, kept, None)
    assert len(manifest) == 200 and manifest["keep"].sum() == 50
    assert set(manifest.loc[manifest["keep"], "sample_id"]) == set(kept)


def test_cluster_balanced_arm_keeps_about_keep_samples_equally_from_every_cluster():
    """keep 30 of 120 in three equal clusters: m = 10 per cluster. Reading the removed fraction
    (0.75) as the kept one would keep 30 per cluster, 90 in all."""
    embeddings, labels = blobs([40, 40, 40], seed=1)
    skewed = np.arange(len(labels))
    kept, clusters = arm_ids(
        "cluster-balanced", skewed=skewed, labels=np.full_like(labels, -1),
        embeddings=embeddings, keep=30, k=3, seed=0,
    )  # fmt: skip
    assert len(kept) == 30 and len(np.unique(kept)) == 30
    assert np.bincount(labels[kept], minlength=3).tolist() == [10, 10, 10]
    per_cluster = clusters.set_index("sample_id").loc[kept, "cluster"].value_counts()
    assert sorted(per_cluster.tolist()) == [10, 10, 10]


def test_cluster_balanced_arm_on_a_subset_keeps_the_same_number_from_every_cluster():
    """The skewed set is a subset of a larger store (ids not 0..n-1): keep 30 of 100, 4 clusters
    of 25, so m = floor(30 / 4) = 7 (not 17, the count if 0.7 were read as the kept fraction)."""
    embeddings, labels = blobs([25, 25, 25, 25, 40], seed=2)
    skewed = np.flatnonzero(labels < 4)  # the fifth group is outside the skewed set
    kept, clusters = arm_ids(
        "cluster-balanced", skewed=skewed, labels=labels, embeddings=embeddings,
        keep=30, k=4, seed=0,
    )  # fmt: skip
    assert len(kept) == 28 and set(kept) <= set(skewed)
    assert np.bincount(labels[kept], minlength=5).tolist() == [7, 7, 7, 7, 0]
    manifest = arm_manifest(len(labels), kept, clusters)
    assert manifest["keep"].sum() == 28
    assert (manifest.loc[manifest["keep"]].groupby("cluster").size() == 7).all()


def test_cluster_balanced_arm_keeps_keep_samples_when_keep_over_size_is_not_a_short_decimal():
    embeddings, labels = blobs([30, 30, 30], seed=1)
    kept, _ = arm_ids(
        "cluster-balanced", skewed=np.arange(len(labels)), labels=np.full_like(labels, -1),
        embeddings=embeddings, keep=30, k=3, seed=0,
    )  # fmt: skip
    assert np.bincount(labels[kept], minlength=3).tolist() == [10, 10, 10]
