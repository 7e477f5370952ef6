"""The baseline quality floor and the paper's claims, judged from the study's runs.

The floor comes first: if the full-data model does not generate every class of the training data
in roughly its share, differences between pruning methods measure which run collapsed less, not
which data was better, and every table says so.

Each claim is a paired comparison over seeds (see `diffprune.stats`) with a verdict:
`supported` or `contradicted` when the 95% interval of the effect lies on one side of the claim's
threshold, `inconclusive` when it straddles it (always with one seed), `not run` when the study
has no runs for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from diffprune.names import FULL, score_of
from diffprune.stats import Interval, paired_difference, ratio_of_means

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"
NOT_RUN = "not run"
CLAIM_COLUMNS = [
    "claim", "statement", "comparison", "ratio", "effect", "mean", "low", "high", "n", "verdict",
]  # fmt: skip


@dataclass(frozen=True)
class Floor:
    """Whether the full-data baseline is good enough to judge the other runs by."""

    passed: bool | None  # None: not checked (no baseline, or no classifier to judge classes)
    text: str  # the rule and every seed's numbers

    @property
    def status(self) -> str:
        """One phrase for captions: passed, FAILED or not checked."""
        return {True: "passed", False: "FAILED", None: "not checked"}[self.passed]


def check_floor(frame: pd.DataFrame, *, max_class_kl: float, min_share_ratio: float) -> Floor:
    """The full-data runs' classifier-judged class balance against the training data's.

    Every seed of the baseline must have KL(train || generated) <= `max_class_kl` and every class
    at least `min_share_ratio` of its training share.
    """
    rule = (
        f"KL(train || generated classes) <= {max_class_kl:g} and every class at least "
        f"{min_share_ratio:.3g} of its training share"
    )
    base = frame[frame["method"] == FULL]
    if base.empty or "class_kl" not in base:
        return Floor(
            None,
            f"Baseline floor not checked ({rule}): no full-data run with a class judge "
            "(needs study.baseline and labelled data).",
        )
    rows = []
    passed = True
    for row in base.itertuples():
        kl, ratio = (
            getattr(row, "class_kl", math.nan),
            getattr(row, "class_share_ratio_min", math.nan),
        )
        ok = bool(kl <= max_class_kl and ratio >= min_share_ratio)  # NaN (failed run) fails
        passed &= ok
        rows.append(f"seed {row.seed}: KL {kl:.3f}, smallest generated/training share {ratio:.2f} "
                    f"{'pass' if ok else 'FAIL'}")  # fmt: skip
    verdict = "PASSES" if passed else "FAILS"
    text = f"Baseline quality floor ({rule}): the full-data model {verdict}; " + "; ".join(rows)
    if not passed:
        text += (
            ". The models are too weak to compare data: treat every table below as a "
            "pipeline check, not evidence."
        )
    return Floor(passed, text + ("" if text.endswith(".") else "."))


def by_seed(frame: pd.DataFrame, method: str, ratio: float | None, column: str) -> pd.Series:
    """`column` of `method`'s runs (at `ratio`, unless None) indexed by seed."""
    rows = frame[frame["method"] == method]
    if ratio is not None:
        rows = rows[np.isclose(rows["ratio"].astype(float), ratio)]
    if column not in rows:
        return pd.Series(dtype=float)
    return rows.set_index("seed")[column].astype(float)


def _oriented(diff: Interval, sign: float) -> Interval:
    """`diff` turned so that positive is what a claim says (sign = -1 flips it)."""
    low, high = sorted((sign * diff.low, sign * diff.high))
    return Interval(sign * diff.mean, low, high, diff.n)


def _verdict(gain: Interval, *, threshold: float = 0.0) -> str:
    """Supported when all of `gain`'s interval is above `threshold`, contradicted when below."""
    if gain.n == 0:
        return NOT_RUN
    if gain.n < 2:
        return INCONCLUSIVE
    if gain.low > threshold:
        return SUPPORTED
    if gain.high < threshold:
        return CONTRADICTED
    return INCONCLUSIVE


def non_inferiority(diff: Interval, *, higher_is_better: bool, allowed: float) -> str:
    """C1's verdict on `diff` = method - full data: supported (non-inferior) when the whole 95%
    interval says the method is worse by less than `allowed` (margin x the full data's mean)."""
    return _verdict(_oriented(diff, 1.0 if higher_is_better else -1.0), threshold=-allowed)


def _row(
    claim: str,
    statement: str,
    comparison: str,
    ratio: float,
    diff: Interval,
    verdict: str,
    note: str = "",
) -> dict:
    effect = diff.format()
    if diff.n >= 2:
        effect = f"{diff.mean:+.4g} [{diff.low:+.3g}, {diff.high:+.3g}] (n={diff.n})"
    effect = "; ".join(part for part in (effect, note) if part)
    values = (claim, statement, comparison, ratio, effect, diff.mean, diff.low, diff.high, diff.n)
    return dict(zip(CLAIM_COLUMNS, (*values, verdict), strict=True))


def _times(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2g}x"


def judge_claims(
    frame: pd.DataFrame,
    *,
    metric: str,
    higher_is_better: bool,
    method: str,
    novelty_metric: str,
    margin: float,
    skew: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per claim (and ratio or rival): the paired effect, its 95% interval, a verdict.

    C1: `method` at each ratio minus full data on `metric`; supported when the loss of quality
        is below `margin` x the baseline's mean with 95% confidence (non-inferiority),
        contradicted when it is above it with 95% confidence.
    C2: `method` minus random, and minus every score-based method, at each ratio: supported when
        `method` is better; the effect notes the selection compute of both.
    C3: `novelty_metric` of `method` at the largest ratio minus full data: supported when novelty
        drops (the paper: aggressive pruning memorises more).
    C4: generated KL(uniform || class shares) of the cluster-balanced arm minus the random arm of
        the fairness study (`skew`, the skew report's table): supported when clustering, which
        sees no labels, reduces the skew.
    """
    sign = 1.0 if higher_is_better else -1.0
    ratios = sorted(frame.loc[frame["method"] == method, "ratio"].dropna().unique()) or [math.nan]
    full = by_seed(frame, FULL, None, metric)
    allowed = margin * abs(full.mean()) if len(full) else math.nan
    rows = []
    for ratio in ratios:
        diff = paired_difference(by_seed(frame, method, ratio, metric), full)
        statement = f"pruning keeps or improves quality ({metric}, margin {margin:.0%})"
        verdict = non_inferiority(diff, higher_is_better=higher_is_better, allowed=allowed)
        rows.append(_row("C1", statement, f"{method} - full data", ratio, diff, verdict))
    scored = sorted(m for m in frame["method"].unique() if score_of(m) is not None)
    for rival in ["random", *scored]:
        for ratio in ratios:
            diff = paired_difference(
                by_seed(frame, method, ratio, metric), by_seed(frame, rival, ratio, metric)
            )
            cost = ratio_of_means(
                by_seed(frame, method, ratio, "selection_seconds"),
                by_seed(frame, rival, ratio, "selection_seconds"),
            )
            note = "" if math.isnan(cost) else f"selection compute {_times(cost)} {rival}'s"
            statement = f"clustering beats {rival} at equal training steps ({metric})"
            verdict = _verdict(_oriented(diff, sign))
            rows.append(_row("C2", statement, f"{method} - {rival}", ratio, diff, verdict, note))
    top = max(ratios)
    diff = paired_difference(
        by_seed(frame, method, top, novelty_metric), by_seed(frame, FULL, None, novelty_metric)
    )
    statement = f"aggressive pruning lowers novelty ({novelty_metric})"
    verdict = _verdict(_oriented(diff, -1.0))
    rows.append(_row("C3", statement, f"{method} - full data", top, diff, verdict))
    rows.append(_skew_row(skew))
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


def _skew_row(skew: pd.DataFrame | None) -> dict:
    statement = "clustering without labels reduces the skew of generated classes"
    comparison = "KL(uniform || generated classes): cluster-balanced arm - random arm"
    arms = {}
    if skew is not None:
        arms = {a: r.set_index("seed")["generated_kl_to_uniform"] for a, r in skew.groupby("arm")}
    if "cluster-balanced" not in arms or "random" not in arms:
        nothing = Interval(math.nan, math.nan, math.nan, 0)
        note = "needs the fairness study's random and cluster-balanced arms (skew.arms)"
        return _row("C4", statement, comparison, math.nan, nothing, NOT_RUN, note)
    diff = paired_difference(arms["cluster-balanced"], arms["random"])
    return _row("C4", statement, comparison, math.nan, diff, _verdict(_oriented(diff, -1.0)))


def claims_markdown(claims: pd.DataFrame, *, caption: str) -> str:
    """The claims table with its caption (scale, seeds, feature space, baseline floor)."""
    lines = [
        caption,
        "",
        "| claim | statement | comparison | removed | effect [95% CI] | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in claims.itertuples():
        ratio = "" if pd.isna(r.ratio) else f"{r.ratio:g}"
        lines.append(
            f"| {r.claim} | {r.statement} | {r.comparison} | {ratio} | {r.effect} "
            f"| **{r.verdict}** |"
        )
    return "\n".join(lines) + "\n"
