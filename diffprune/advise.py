"""How much data can be dropped, and with which method: the study's answer as a recommendation.

For each method, the largest pruning ratio whose headline metric is non-inferior to the full data:
the paired 95% t-interval over seeds of (method - full data) says the method is worse by less
than the claims margin x the full data's mean (claim C1's rule, `claims.non_inferiority`). The
recommendation is the non-inferior choice that removes the most data (the largest ratio, as
named in the run id); equal ratios go to the cheaper selection (mean `selection_seconds`). When
nothing is non-inferior, it says why and how many seeds the observed spread would need.
Failed runs (status != ok) are left out and counted.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from diffprune.claims import SUPPORTED, by_seed, non_inferiority
from diffprune.errors import DataError
from diffprune.names import FULL, SKEW
from diffprune.stats import CONFIDENCE, Interval, paired_difference

MAX_SEEDS = 10_000  # seeds-needed search stops here ("more than 10000")


@dataclass(frozen=True)
class Point:
    """One method at one ratio against the full data."""

    method: str
    ratio: float
    diff: Interval  # method - full data, paired by seed
    safe: bool  # non-inferior at this evidence
    seeds: str  # how many seeds the observed spread would need ("" when safe)
    cost: float  # mean selection seconds


def read_summary(results_dir: str | os.PathLike) -> pd.DataFrame:
    """The study's summary.csv (written by the report); a missing file names the path."""
    path = Path(results_dir) / "summary.csv"
    if not path.is_file():
        raise DataError(f"{path}: no such file; run the study's report first (results dir)")
    frame = pd.read_csv(path)
    missing = [c for c in ("method", "ratio", "seed", "status") if c not in frame]
    if missing:
        raise DataError(f"{path}: lacks columns {missing}; is it a diffprune summary.csv?")
    return frame


def seeds_needed(diff: Interval, *, higher_is_better: bool, allowed: float) -> str:
    """The smallest n with t_{0.975,n-1} * sd / sqrt(n) < (observed gain + allowed), where gain
    is the mean difference oriented so that positive is better and sd the observed paired sd;
    "cannot" when the observed mean itself is outside the margin."""
    if diff.n < 2:
        return "at least 2 seeds to measure the spread"
    slack = (diff.mean if higher_is_better else -diff.mean) + allowed
    if not slack > 0:
        return "cannot (the observed mean difference is itself outside the margin)"
    t_now = stats.t.ppf(0.5 + CONFIDENCE / 2, df=diff.n - 1)
    sd = diff.half_width * math.sqrt(diff.n) / t_now
    n = np.arange(2, MAX_SEEDS + 1)
    fits = stats.t.ppf(0.5 + CONFIDENCE / 2, df=n - 1) * sd / np.sqrt(n) < slack
    return f"{int(n[fits.argmax()])} seeds" if fits.any() else f"more than {MAX_SEEDS} seeds"


def points(
    frame: pd.DataFrame, *, metric: str, higher_is_better: bool, margin: float
) -> list[Point]:
    """Every (method, ratio) of the study's ok runs, judged against the full data's ok runs."""
    if metric not in frame:
        raise DataError(f"metric {metric!r} is not in the summary; have: {sorted(frame.columns)}")
    ok = frame[frame["status"] == "ok"]
    full = by_seed(ok, FULL, None, metric)
    allowed = margin * abs(full.mean()) if len(full) else math.nan
    grid = ok[(ok["method"] != FULL) & ~ok["method"].str.startswith(SKEW)]
    result = []
    for (method, ratio), group in grid.groupby(["method", "ratio"]):
        diff = paired_difference(by_seed(ok, method, ratio, metric), full)
        safe = non_inferiority(diff, higher_is_better=higher_is_better, allowed=allowed)
        need = "" if safe == SUPPORTED else seeds_needed(
            diff, higher_is_better=higher_is_better, allowed=allowed
        )  # fmt: skip
        cost = float(group["selection_seconds"].mean()) if "selection_seconds" in group else 0.0
        result.append(Point(method, float(ratio), diff, safe == SUPPORTED, need, cost))
    return result


def recommend(found: list[Point]) -> Point | None:
    """The non-inferior point with the largest ratio; equal ratios go to the cheaper selection."""
    safe = [p for p in found if p.safe]
    return min(safe, key=lambda p: (-p.ratio, p.cost, p.method)) if safe else None


def advice(frame: pd.DataFrame, *, metric: str, higher_is_better: bool, margin: float) -> str:
    """The advice as plain lines: the rule, each method's largest safe ratio with every ratio's
    paired difference, the failed runs left out, and the `recommendation:` line last."""
    found = points(frame, metric=metric, higher_is_better=higher_is_better, margin=margin)
    better = "higher" if higher_is_better else "lower"
    lines = [
        f"Non-inferior to the full data on {metric} ({better} is better): the paired 95% "
        f"interval over seeds of (method - full data) is worse by less than {margin:.0%} of the "
        "full data's mean."
    ]
    for method in sorted({p.method for p in found}):
        mine = sorted((p for p in found if p.method == method), key=lambda p: p.ratio)
        best = max((p.ratio for p in mine if p.safe), default=None)
        detail = "; ".join(_detail(p) for p in mine)
        lines.append(f"{method}: largest non-inferior ratio {_ratio(best)} ({detail})")
    failed = frame[frame["status"] != "ok"]
    if len(failed):
        names = ", ".join(f"{r.method} r{r.ratio:g} s{r.seed}" for r in failed.itertuples())
        lines.append(f"excluded {len(failed)} failed run(s): {names}")
    lines.append(_recommendation(found, has_full=bool((frame["method"] == FULL).any())))
    return "\n".join(lines) + "\n"


def _detail(p: Point) -> str:
    """One ratio's paired difference [95% CI], and the seeds it would need when not safe."""
    d = p.diff
    text = d.format() if d.n < 2 else f"{d.mean:+.4g} [{d.low:+.3g}, {d.high:+.3g}] (n={d.n})"
    return f"r{p.ratio:g}: {text}, " + ("non-inferior" if p.safe else f"seeds needed: {p.seeds}")


def _ratio(ratio: float | None) -> str:
    return "none" if ratio is None else f"{ratio:g}"


def _recommendation(found: list[Point], *, has_full: bool) -> str:
    best = recommend(found)
    if best is not None:
        return f"recommendation: {best.method} at ratio {best.ratio:g}"
    if not has_full or not found:
        return "recommendation: none (the study needs ok full-data runs and pruned runs)"
    counts = [(int(p.seeds.split()[0]), p) for p in found if p.seeds.split()[0].isdigit()]
    hint = "; no ratio would become non-inferior with more seeds at the observed differences"
    if counts:
        n, p = min(counts, key=lambda c: (c[0], -c[1].ratio))
        hint = f"; the closest, {p.method} at ratio {p.ratio:g}, would need {n} seeds"
    return f"recommendation: none (no ratio is non-inferior at this evidence{hint})"
