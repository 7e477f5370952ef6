"""Statistics over seeds: means with confidence intervals and paired differences.

Every grid point runs once per seed, and a seed fixes the selection's randomness, the model's
initialisation, its batches and the sampler's noise. Comparing two methods seed by seed (a paired
difference) cancels what the two runs of a seed share, so the interval of the mean difference is
narrower than the two means' intervals suggest. Intervals are Student-t intervals over seeds
(exact for normal noise, the usual choice for 3 to 10 seeds, where a bootstrap has too few
resamples to mean anything).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over `n` seeds and its confidence interval (`low`, `high` are NaN when n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def format(self, digits: int = 4) -> str:
        """`mean ± half-width (n=…)`, or the single value with n=1."""
        if math.isnan(self.mean):
            return ""
        if self.n < 2:
            return f"{self.mean:.{digits}g} (n=1)"
        return f"{self.mean:.{digits}g} ± {self.half_width:.2g} (n={self.n})"


def mean_ci(values: Sequence[float] | np.ndarray, *, confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t confidence interval of independent values (NaNs dropped)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * sem
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(a: pd.Series, b: pd.Series, *, confidence: float = CONFIDENCE) -> Interval:
    """Mean of a - b over the seeds both have (Series indexed by seed), with its interval."""
    joined = pd.concat({"a": a, "b": b}, axis=1).dropna()
    return mean_ci(joined["a"] - joined["b"], confidence=confidence)


def ratio_of_means(a: Sequence[float], b: Sequence[float]) -> float:
    """mean(a) / mean(b), NaN when b's mean is 0 or either is empty (compute ratios)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) == 0 or len(b) == 0 or np.nanmean(b) == 0:
        return math.nan
    return float(np.nanmean(a) / np.nanmean(b))
