"""The one list of names: the schema, the modules and the Snakemake wildcards agree with it, and the
run-id format has one parser."""

import re

import pytest
import yaml

from diffprune import features, names, select, skew
from diffprune.config import SCHEMA

SCHEMA_PROPERTIES = yaml.safe_load(SCHEMA.read_text())["properties"]


def schema_enum(*path: str) -> list:
    node = SCHEMA_PROPERTIES
    for key in path:
        node = node[key]
    return node["enum"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (("study", "properties", "methods", "items"), names.METHODS),
        (("study", "properties", "extra_runs", "items"), names.EXTRA_RUNS),
        (("skew", "properties", "arms", "items"), names.SKEW_ARMS),
        (("evaluate", "properties", "features", "items"), names.FEATURES),
        (("select", "properties", "balanced_order"), names.BALANCED_ORDERS),
        (("report", "properties", "claims", "properties", "method"), names.CLUSTER_METHODS),
    ],
)
def test_schema_enums_are_the_names(path, expected):
    assert schema_enum(*path) == list(expected)


def test_modules_use_the_names():
    assert features.FEATURES == names.FEATURES
    assert list(skew.ARM_RULES) == list(names.SKEW_ARMS)
    for method in names.METHODS:
        assert select.describe(method)  # every method has its KEEPS text


def test_extra_runs_parse_as_runs_of_known_methods():
    for run in map(names.Run.parse, names.EXTRA_RUNS):
        assert run.method in names.METHODS and run.ratio is not None


@pytest.mark.parametrize(
    "name",
    ["full", "random_r0.5", "cluster-furthest_r0.25", "el2n-mid_r0.9", "cluster-balanced_r0.0",
     "skew-random", "skew-label-balanced"],
)  # fmt: skip
def test_run_ids_round_trip(name):
    assert names.Run.parse(name).name == name


@pytest.mark.parametrize("name", ["random-0.5", "kmeans_r0.5", "skew-everything", "full_r0.5"])
def test_bad_run_id(name):
    with pytest.raises(ValueError, match="is not 'full'"):
        names.Run.parse(name)


def test_skew_runs_know_their_arm():
    run = names.Run.skew("cluster-balanced")
    assert run.name == "skew-cluster-balanced" and run.ratio is None
    assert names.Run.parse(run.name).arm == "cluster-balanced"
    assert names.Run("cluster-balanced", 0.5).arm is None


def test_needs_and_the_scores_methods_need():
    assert names.needs("random") == set()
    assert names.needs("cluster-mid") == {"clusters"}
    assert names.needs("forgetting-inverse") == {"scores:forgetting"}
    with pytest.raises(ValueError, match="unknown selection method 'kmeans'; allowed: random"):
        names.needs("kmeans")
    methods = ["random", "cluster-furthest", "moso-mid", "el2n", "el2n-inverse"]
    assert names.scores_for(methods) == ["el2n", "moso"]
    assert names.surrogates_for(methods) == ["full", "moso"]
    assert names.scores_for(["random", "cluster-balanced"]) == []
    assert names.surrogates_for(["grand", "forgetting-mid"]) == ["full"]


def allowed(pattern: str, candidates) -> list[str]:
    return [c for c in candidates if re.fullmatch(f"(?:{pattern})", c)]


def test_wildcard_constraints_allow_exactly_the_names():
    constraints = names.wildcard_constraints()
    lookalikes = ["", "x", "el2n-inverse", "train2", "efficientnet_lite0", "skewed-random"]
    for wildcard, listed in [
        ("split", names.SPLITS),
        ("score", names.SCORES),
        ("kind", names.SURROGATES),
        ("feature", names.FEATURES),
        ("arm", names.SKEW_ARMS),
    ]:
        assert allowed(constraints[wildcard], [*listed, *lookalikes]) == list(listed)
    runs = ["full", "random_r0.5", "el2n-mid_r0.75", "cluster-balanced_r0.0", "skew-skewed"]
    bad = ["kmeans_r0.5", "skew-kmeans", "full_r0.5", "random", "random_r", "random_rx"]
    assert allowed(constraints["run"], [*runs, *bad]) == runs
    assert allowed(names.SELECTED_RUN, [*runs, *bad]) == runs[:-1]
    assert allowed(constraints["seed"], ["0", "12", "-1", "s0"]) == ["0", "12"]
