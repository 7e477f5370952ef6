"""The one list of names: selection methods and what each needs, scores and their surrogates,
evaluation feature spaces, the fairness study's arms, and the run-id format.

Everything else takes its names from here: the Snakemake wildcard constraints
(`wildcard_constraints`, used by workflow/rules/common.smk), the selection rules, the config
checks, and the schema's enums, which tests/test_names.py checks against these lists (the schema
stays a plain file that editors and `jsonschema` read as it is).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from diffprune.errors import ConfigError

RANDOM = "random"
CLUSTER_METHODS = (
    "cluster-furthest",
    "cluster-nearest",
    "cluster-mid",
    "cluster-random",
    "cluster-balanced",
)
# Score-based rules: <score> keeps the highest scores, <score>-inverse the lowest, <score>-mid the
# middle of the ranking.
SCORES = ("el2n", "grand", "forgetting", "moso")
# Scores computed row by row from the store in batches, each row's value from its own fixed draw
# (keyed by sample id): scores.shards splits these into jobs over whole batches. Forgetting reads
# the surrogate's loss records, MoSo a subset's mean gradient: neither is a per-row job.
ROW_SCORES = ("el2n", "grand")
SCORE_VARIANTS = ("", "-inverse", "-mid")
# SemDeDup (Abbas et al. 2023): near-duplicates by cosine similarity within each k-means cluster.
SEMDEDUP = "semdedup"
METHODS = (
    RANDOM,
    *CLUSTER_METHODS,
    *(f"{score}{variant}" for score in SCORES for variant in SCORE_VARIANTS),
    SEMDEDUP,
)
# Which surrogate each score reads: `full`, one model on all training data, or `moso`, MoSo's
# surrogates on disjoint subsets.
SURROGATE_OF = {"el2n": "full", "grand": "full", "forgetting": "full", "moso": "moso"}
SURROGATES = ("full", "moso")
BALANCED_ORDERS = ("furthest", "nearest")

# Evaluation feature spaces; metric names spell them with "_" (`fd_efficientnet_lite0`).
FEATURES = ("classifier", "efficientnet-lite0", "inception")
SPLITS = ("train", "test")
# The fairness study's arms (diffprune.skew), run as `skew-<arm>`.
SKEW_ARMS = ("skewed", "random", "cluster-balanced", "label-balanced")

# Run ids: `full` (the baseline on all data), `skew-<arm>`, or `<method>_r<ratio>` with the ratio
# (fraction removed) written as Python's repr of the float, e.g. `cluster-furthest_r0.5`.
FULL = "full"
SKEW = "skew-"
RATIO = r"[0-9.]+"
# Runs outside the methods x ratios grid that study.extra_runs may name.
EXTRA_RUNS = ("cluster-balanced_r0.0",)


def _alternatives(names: Iterable[str]) -> str:
    """A regex alternation of `names`, literally (group it before adding to it)."""
    return "|".join(re.escape(name) for name in names)


_GRID_RUN = re.compile(rf"^(?P<method>{_alternatives(METHODS)})_r(?P<ratio>{RATIO})$")
# The runs the `select` rule writes: the baseline and the grid's `<method>_r<ratio>`.
SELECTED_RUN = rf"{re.escape(FULL)}|(?:{_alternatives(METHODS)})_r{RATIO}"


@dataclass(frozen=True, order=True)
class Run:
    """One grid point: a selection method at a pruning ratio (fraction removed), the baseline
    (`full`) or an arm of the fairness study (`skew-<arm>`, no ratio)."""

    method: str
    ratio: float | None = None

    @property
    def name(self) -> str:
        return self.method if self.ratio is None else f"{self.method}_r{self.ratio!r}"

    @classmethod
    def skew(cls, arm: str) -> Run:
        return cls(f"{SKEW}{arm}")

    @property
    def arm(self) -> str | None:
        """The fairness study's arm of a `skew-<arm>` run, else None."""
        return self.method.removeprefix(SKEW) if self.method.startswith(SKEW) else None

    @classmethod
    def parse(cls, name: str) -> Run:
        if name == FULL or (name.startswith(SKEW) and name.removeprefix(SKEW) in SKEW_ARMS):
            return cls(name)
        match = _GRID_RUN.match(name)
        if not match:
            raise ConfigError(
                f"run id {name!r} is not 'full', 'skew-<arm>' or '<method>_r<ratio>'; "
                f"methods: {', '.join(METHODS)}; arms: {', '.join(SKEW_ARMS)}"
            )
        return cls(match["method"], float(match["ratio"]))

    def __str__(self) -> str:
        return self.name


def score_of(method: str) -> str | None:
    """The score a score-based method ranks by (`el2n` for el2n-inverse), else None."""
    for score in SCORES:
        if method in (f"{score}{variant}" for variant in SCORE_VARIANTS):
            return score
    return None


def validate_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"unknown selection method {method!r}; allowed: {', '.join(METHODS)}")
    return method


def needs(method: str) -> set[str]:
    """Inputs a method needs: {"clusters"}, {"clusters", "embeddings"} (semdedup),
    {"scores:<name>"} or nothing (random)."""
    validate_method(method)
    if method == SEMDEDUP:
        return {"clusters", "embeddings"}
    if method in CLUSTER_METHODS:
        return {"clusters"}
    score = score_of(method)
    return set() if score is None else {f"scores:{score}"}


def scores_for(methods: Iterable[str]) -> list[str]:
    """The scores that `methods` rank by, in SCORES order (what the `score` rule computes)."""
    wanted = {score_of(method) for method in methods}
    return [score for score in SCORES if score in wanted]


def surrogates_for(methods: Iterable[str]) -> list[str]:
    """The surrogates those scores read, in SURROGATES order."""
    wanted = {SURROGATE_OF[score] for score in scores_for(methods)}
    return [kind for kind in SURROGATES if kind in wanted]


def feature_key(feature: str) -> str:
    """A feature space as metric names spell it: `efficientnet-lite0` -> `efficientnet_lite0`."""
    return feature.replace("-", "_")


def wildcard_constraints() -> dict[str, str]:
    """Regexes of the Snakemake wildcards, each allowing exactly the names above."""
    return {
        "split": _alternatives(SPLITS),
        "score": _alternatives(SCORES),
        "kind": _alternatives(SURROGATES),
        "feature": _alternatives(FEATURES),
        "run": f"{SELECTED_RUN}|{re.escape(SKEW)}(?:{_alternatives(SKEW_ARMS)})",
        "arm": _alternatives(SKEW_ARMS),
        "seed": r"\d+",
    }
