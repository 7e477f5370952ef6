"""Confidence intervals and paired differences over seeds, on synthetic seeds with known answers."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from diffprune.stats import mean_ci, paired_difference, ratio_of_means


def test_mean_ci_is_the_student_t_interval():
    values = [1.0, 2.0, 4.0]
    ci = mean_ci(values)
    half = scipy_stats.t.ppf(0.975, df=2) * np.std(values, ddof=1) / math.sqrt(3)
    assert ci.mean == pytest.approx(7 / 3)
    assert (ci.low, ci.high) == pytest.approx((7 / 3 - half, 7 / 3 + half))
    assert ci.n == 3
    assert ci.format() == f"2.333 ± {half:.2g} (n=3)"


def test_mean_ci_drops_nans_and_has_no_interval_for_one_value():
    assert mean_ci([5.0, math.nan]).n == 1
    single = mean_ci([5.0])
    assert single.mean == 5.0 and math.isnan(single.low) and not single.excludes_zero()
    assert single.format() == "5 (n=1)"
    assert mean_ci([]).n == 0 and mean_ci([]).format() == ""


def test_wider_confidence_gives_a_wider_interval():
    values = np.random.default_rng(0).normal(size=5)
    assert mean_ci(values, confidence=0.99).half_width > mean_ci(values).half_width


def seeds(values):
    return pd.Series(values, index=range(len(values)), dtype=float)


def test_identical_runs_give_an_interval_that_contains_zero():
    rng = np.random.default_rng(1)
    a = seeds(rng.normal(300, 20, size=5))
    diff = paired_difference(a, a + rng.normal(0, 1e-3, size=5))
    assert diff.low <= 0 <= diff.high
    assert not diff.excludes_zero()


def test_a_shifted_run_gives_an_interval_that_excludes_zero():
    rng = np.random.default_rng(2)
    base = rng.normal(300, 20, size=5)  # large seed-to-seed spread, shared by the pair
    shifted = base - 10 + rng.normal(0, 1, size=5)
    diff = paired_difference(seeds(shifted), seeds(base))
    assert diff.high < 0 and diff.excludes_zero()
    assert diff.mean == pytest.approx(-10, abs=2)
    # unpaired, the same numbers cannot tell the shift from the spread
    assert mean_ci(shifted).high > mean_ci(base).low


def test_paired_difference_uses_only_seeds_both_have():
    a = pd.Series([1.0, 2.0, 3.0], index=[0, 1, 2])
    b = pd.Series([0.0, 0.0], index=[1, 2])
    diff = paired_difference(a, b)
    assert diff.n == 2 and diff.mean == pytest.approx(2.5)


def test_ratio_of_means():
    assert ratio_of_means([1, 3], [4]) == pytest.approx(0.5)
    assert math.isnan(ratio_of_means([], [1]))
    assert math.isnan(ratio_of_means([1], [0]))
