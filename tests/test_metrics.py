import numpy as np
import pytest
from cleanfid import fid as cleanfid_fid

from diffprune import metrics
from diffprune.errors import DataError
from diffprune.metrics import (
    KL_EPS,
    class_shares,
    coverage,
    frechet_distance,
    kid,
    kl_divergence,
    load_reference,
    near_copy_threshold,
    nearest_centroid,
    novelty,
    precision_recall,
    reference_neighbours,
    reference_stats,
    save_reference,
    vendi,
)


def gaussian(n: int, d: int, *, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, scale, size=(n, d))


def diagonal_fd(mu1, s1, mu2, s2) -> float:
    """Closed form for diagonal covariances s1, s2 (variances)."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


# --- Fréchet distance -------------------------------------------------------------------------


def test_fd_of_a_set_with_itself_is_zero():
    feats = gaussian(500, 8, seed=0)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(feats, feats + 0.5) == pytest.approx(8 * 0.25, rel=1e-6)


def test_fd_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = diagonal_fd(mu1, s1, mu2, s2)  # 0.25 + 4 + (3 - 2 sqrt 2) + 1 = 5.4216
    stats_a = {"mu": mu1, "sigma": np.diag(s1)}
    stats_b = {"mu": mu2, "sigma": np.diag(s2)}
    assert frechet_distance(stats_a, stats_b) == pytest.approx(expected, rel=1e-9)
    # estimated from large seeded samples of the same Gaussians
    rng = np.random.default_rng(1)
    a = mu1 + rng.normal(size=(200_000, 3)) * np.sqrt(s1)
    b = mu2 + rng.normal(size=(200_000, 3)) * np.sqrt(s2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.01)
    # features on one side, stats on the other
    assert frechet_distance(a, stats_b) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize(
    ("n_a", "n_b", "dim"),
    [(400, 300, 16), (2000, 512, 256), (60, 40, 64), (30, 30, 128)],  # the last two: N < D
)
def test_fd_matches_clean_fid_on_random_and_near_singular_covariances(n_a, n_b, dim):
    rng = np.random.default_rng(dim)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a = rng.normal(size=(n_a, dim)) @ mixing
    b = rng.normal(0.1, 1.0, size=(n_b, dim)) @ (mixing + 0.3 * np.eye(dim))
    stats_a, stats_b = reference_stats(a), reference_stats(b)
    expected = cleanfid_fid.frechet_distance(
        stats_a["mu"], stats_a["sigma"], stats_b["mu"], stats_b["sigma"]
    )
    assert frechet_distance(stats_a, stats_b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(stats_b, stats_a) == pytest.approx(expected, rel=1e-6)


def test_fd_of_rank_deficient_covariances_matches_clean_fid():
    """Covariances of rank 5 in 40 dimensions: most eigenvalues are rounding noise around 0."""
    rng = np.random.default_rng(3)
    basis = rng.normal(size=(5, 40))
    a = rng.normal(size=(500, 5)) @ basis
    b = rng.normal(size=(500, 5)) @ basis * 1.5 + 0.2
    sa, sb = reference_stats(a), reference_stats(b)
    expected = cleanfid_fid.frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"])
    assert frechet_distance(sa, sb) == pytest.approx(expected, rel=1e-6)


def test_fd_refuses_mismatched_dims():
    with pytest.raises(ValueError, match="dims differ"):
        frechet_distance(gaussian(10, 3, seed=0), gaussian(10, 4, seed=0))
    with pytest.raises(ValueError, match="expected 'mu' and 'sigma'"):
        frechet_distance({"mu": np.zeros(3)}, gaussian(10, 3, seed=0))


def test_reference_stats_round_trip(tmp_path):
    feats = gaussian(50, 4, seed=2)
    stats = reference_stats(feats)
    np.testing.assert_allclose(stats["mu"], feats.mean(0))
    np.testing.assert_allclose(stats["sigma"], np.cov(feats.T))
    save_reference(tmp_path / "a.npz", stats)
    save_reference(tmp_path / "b.npz", reference_stats(feats.copy()))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = load_reference(tmp_path / "a.npz")
    for key in ("mu", "sigma", "features"):
        np.testing.assert_array_equal(loaded[key], stats[key])
    other = gaussian(60, 4, seed=3, shift=1.0)
    assert frechet_distance(loaded, other) == frechet_distance(feats, other)
    with pytest.raises(DataError, match="do not exist"):
        load_reference(tmp_path / "missing.npz")


# --- KID --------------------------------------------------------------------------------------


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    a = gaussian(300, 16, seed=4)
    same = kid(a, gaussian(300, 16, seed=5))
    shifted = kid(a, gaussian(300, 16, seed=6, shift=1.0))
    assert abs(same) < 0.02
    assert shifted > 0.5
    assert shifted > 50 * abs(same)


@pytest.mark.parametrize("gram_rows", [metrics.KID_GRAM_ROWS, 10])  # 10: per-subset products
def test_kid_equals_clean_fids_kernel_distance_after_seeding(monkeypatch, gram_rows):
    monkeypatch.setattr(metrics, "KID_GRAM_ROWS", gram_rows)
    a, b = gaussian(120, 32, seed=30), gaussian(200, 32, seed=31, shift=0.3)
    for kwargs in ({}, {"num_subsets": 7, "max_subset_size": 50}):
        np.random.seed(5)
        expected = cleanfid_fid.kernel_distance(a, b, **kwargs)
        assert kid(a, b, seed=5, **kwargs) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_kid_is_seeded_and_leaves_global_randomness_alone():
    a, b = gaussian(300, 8, seed=7), gaussian(200, 8, seed=8, shift=0.2)
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    first = kid(a, b, seed=1)
    assert np.random.rand() == expected_next
    assert kid(a, b, seed=1) == first
    assert kid(a, b, seed=2) != first


# --- precision and recall ---------------------------------------------------------------------


def brute_precision_recall(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    def share(q, c, r):
        return (np.linalg.norm(q[:, None] - c[None], axis=-1) <= r[None]).any(1).mean()

    return share(fake, real, radii(real)), share(real, fake, radii(fake))


def test_precision_recall_identical_sets_are_one():
    real = gaussian(300, 5, seed=9)
    assert precision_recall(real, real.copy()) == (1.0, 1.0)


def test_precision_recall_fall_when_shifted():
    real = gaussian(300, 5, seed=10)
    near = precision_recall(real, gaussian(300, 5, seed=11, shift=0.3))
    far = precision_recall(real, gaussian(300, 5, seed=12, shift=10.0))
    assert far == (0.0, 0.0)
    assert 0.0 < near[0] < 1.0 and 0.0 < near[1] < 1.0


def test_precision_high_recall_low_for_a_collapsed_generator():
    real = gaussian(400, 2, seed=13)
    collapsed = gaussian(400, 2, seed=14, scale=0.1)  # all samples in the densest region
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision > 0.95 and recall < 0.3


def test_precision_recall_chunking_matches_brute_force(monkeypatch):
    real, fake = gaussian(97, 3, seed=15), gaussian(83, 3, seed=16, shift=0.5)
    expected = brute_precision_recall(real, fake, 3)
    assert precision_recall(real, fake, k=3, batch_size=10) == pytest.approx(expected)
    assert precision_recall(real, fake, k=3, batch_size=1000) == pytest.approx(expected)
    monkeypatch.setattr(metrics, "MAX_CHUNK_CELLS", 500)  # large sets: chunks shrink to 5 rows
    assert precision_recall(real, fake, k=3, batch_size=1000) == pytest.approx(expected)
    assert precision_recall(real, fake, k=5) == pytest.approx(brute_precision_recall(real, fake, 5))


def test_precision_recall_with_stored_real_radii_is_unchanged():
    real, fake = gaussian(150, 4, seed=32), gaussian(90, 4, seed=33, shift=0.4)
    stored = reference_neighbours(real, k=3, batch_size=16)
    expected = precision_recall(real, fake, k=3)
    assert precision_recall(real, fake, k=3, real_radii2=stored["knn_radii2"]) == expected
    with pytest.raises(ValueError, match="real_radii2 has shape"):
        precision_recall(real, fake, real_radii2=stored["knn_radii2"][:5])


# --- Vendi ------------------------------------------------------------------------------------


def test_vendi_identical_points_is_one():
    assert vendi(np.tile([[0.3, -1.0, 2.0]], (50, 1))) == pytest.approx(1.0)


def test_vendi_three_orthogonal_groups_is_three():
    groups = np.repeat(np.eye(3)[:, None, :] * [[[2.0]], [[5.0]], [[0.5]]], 20, axis=1)
    feats = np.concatenate([groups.reshape(60, 3), np.zeros((60, 4))], axis=1)  # D=7 > 3 groups
    assert vendi(feats) == pytest.approx(3.0)
    assert vendi(feats[:, :3]) == pytest.approx(3.0)  # n > D path


def test_vendi_matches_the_definition_on_random_features():
    feats = gaussian(40, 6, seed=17)
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    eig = np.linalg.eigvalsh(x @ x.T / len(x))
    eig = eig[eig > 1e-12]
    expected = np.exp(-np.sum(eig * np.log(eig)))
    assert vendi(feats) == pytest.approx(expected, rel=1e-9)  # n > D: via X^T X
    assert vendi(gaussian(5, 6, seed=18)) <= 5.0 + 1e-9  # n < D: at most n


# --- novelty ----------------------------------------------------------------------------------


def test_novelty_is_zero_for_copies_of_training_samples():
    train = gaussian(500, 16, seed=19) * 100
    result = novelty(train[::5].copy(), train)
    assert result["novelty_mean"] == 0.0 and result["novelty_median"] == 0.0
    assert result["near_copy_share"] == 1.0


def test_novelty_measures_the_nearest_training_sample():
    train = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    generated = np.array([[0.0, 1.0], [10.0, 3.0], [5.0, 5.0]])
    result = novelty(generated, train, copy_threshold=1.0)
    assert result["novelty_mean"] == pytest.approx((1 + 3 + np.sqrt(50)) / 3)
    assert result["novelty_median"] == pytest.approx(3.0)
    assert result["near_copy_share"] == pytest.approx(1 / 3)
    assert result["near_copy_threshold"] == 1.0


def test_novelty_default_threshold_is_first_percentile_of_train_nn_distances(monkeypatch):
    train = gaussian(300, 4, seed=20)
    d = np.linalg.norm(train[:, None] - train[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    expected = np.quantile(d.min(1), 0.01)
    # the subset is the whole set here, so the threshold is exact
    result = novelty(gaussian(100, 4, seed=21), train, threshold_subset=300, batch_size=64)
    assert result["near_copy_threshold"] == pytest.approx(expected)
    monkeypatch.setattr(metrics, "MAX_CHUNK_CELLS", 3000)  # 10-row chunks
    assert novelty(gaussian(100, 4, seed=21), train, threshold_subset=300) == result
    monkeypatch.undo()
    # a seeded subset: deterministic, and close to the full value
    a = novelty(train[:10], train, threshold_subset=100, seed=3)["near_copy_threshold"]
    assert a == novelty(train[:10], train, threshold_subset=100, seed=3)["near_copy_threshold"]
    assert 0 < a < np.quantile(d.min(1), 0.2)
    # generated samples slightly off training samples count as near copies, far ones do not
    off = train[:50] + expected / 10
    assert novelty(off, train, threshold_subset=300)["near_copy_share"] == 1.0
    assert novelty(train[:50] + 5.0, train)["near_copy_share"] == 0.0


def test_reference_neighbours_lists_the_nearest_other_rows():
    x = gaussian(60, 3, seed=34)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    stored = reference_neighbours(x, k=3, neighbours=5, batch_size=7)
    np.testing.assert_allclose(stored["knn_radii2"], np.sort(d, axis=1)[:, 3] ** 2, rtol=1e-9)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_array_equal(stored["neighbours"], np.argsort(d, axis=1)[:, :5])
    assert stored["neighbours"].dtype == np.int64 and int(stored["pr_k"]) == 3


@pytest.mark.parametrize("neighbours", [16, 2])  # 2: many kept rows list no kept neighbour
def test_near_copy_threshold_from_neighbours_equals_the_full_search(neighbours):
    train = gaussian(400, 6, seed=35)
    stored = reference_neighbours(train, neighbours=neighbours)["neighbours"]
    kept = np.flatnonzero(np.random.default_rng(0).random(400) < 0.3)
    for rows, subset in ((None, 2000), (None, 50), (kept, 2000), (kept, 40)):
        plain = near_copy_threshold(train, rows=rows, subset=subset, seed=4)
        fast = near_copy_threshold(train, rows=rows, subset=subset, seed=4, neighbours=stored)
        assert fast == plain
    # the kept subset's threshold is the one novelty() finds on the kept rows alone
    expected = novelty(train[:5], train[kept])["near_copy_threshold"]
    assert near_copy_threshold(train, rows=kept, neighbours=stored) == expected
    with pytest.raises(ValueError, match="expected \\(400, K\\)"):
        near_copy_threshold(train, neighbours=stored[:10])


def test_reference_file_keeps_its_neighbour_statistics(tmp_path):
    feats = gaussian(40, 3, seed=36)
    stats = reference_stats(feats) | reference_neighbours(feats)
    save_reference(tmp_path / "ref.npz", stats)
    loaded = load_reference(tmp_path / "ref.npz")
    assert set(loaded) == set(metrics.STATS_KEYS + metrics.NEIGHBOUR_KEYS)
    assert loaded["pr_k"].shape == () and int(loaded["pr_k"]) == metrics.PR_K
    for key, value in stats.items():
        np.testing.assert_array_equal(loaded[key], value)
    with pytest.raises(ValueError, match="neighbour keys"):
        save_reference(tmp_path / "part.npz", {**reference_stats(feats), "pr_k": stats["pr_k"]})


# --- coverage and class balance ---------------------------------------------------------------


def test_coverage_detects_a_missing_mode():
    real = np.repeat(np.arange(4), 25)
    full = coverage(np.repeat(np.arange(4), 10), real, k=4)
    assert full == {"mode_coverage": 1.0, "occupancy_kl": pytest.approx(0.0, abs=1e-5)}
    missing = coverage(np.repeat(np.arange(3), 10), real, k=4)
    assert missing["mode_coverage"] == 0.75
    assert missing["occupancy_kl"] > 2.0  # about 0.25 * log(0.25 / 1e-6) ~ 3.1
    # clusters empty in the real data do not count towards coverage
    assert coverage(np.array([0, 1]), np.array([0, 1, 1]), k=5)["mode_coverage"] == 1.0


def test_nearest_centroid_assigns_generated_samples():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    feats = np.array([[1.0, 1.0], [9.0, 2.0], [-1.0, 8.0], [0.2, 0.1]])
    assignments = nearest_centroid(feats, centroids, batch_size=3)
    np.testing.assert_array_equal(assignments, [0, 1, 2, 0])
    assert assignments.dtype == np.int64


def test_class_shares_and_kl():
    shares = class_shares(np.array([0, 0, 1, 3]), 4)
    np.testing.assert_allclose(shares, [0.5, 0.25, 0.0, 0.25])
    assert kl_divergence(shares, shares) == pytest.approx(0.0, abs=1e-5)
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert kl_divergence(p, q) == pytest.approx(expected, rel=1e-5)
    assert kl_divergence([1.0, 1.0], [0.0, 2.0]) == pytest.approx(
        0.5 * np.log(0.5 / (KL_EPS / (1 + 2 * KL_EPS)))
        + 0.5 * np.log(0.5 / ((1 + KL_EPS) / (1 + 2 * KL_EPS)))
    )
    with pytest.raises(ValueError, match=r"allowed 0\.\.3"):
        class_shares(np.array([0, 4]), 4)
    with pytest.raises(ValueError, match="equal length"):
        kl_divergence(p, shares)
