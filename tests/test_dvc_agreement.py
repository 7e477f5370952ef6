"""dvc.yaml is generated from the Snakefile: one stage per job, with exactly what the job reads.

The projects here hold placeholder outputs (no model is trained): what is checked is the plan of
each engine, which depends on files, times and hashes only.
"""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from diffprune import paths
from diffprune.code_deps import library_modules
from diffprune.dvc_yaml import ONE_JOB, RUN_ENV, SEEDS, STALE, shape_digest
from tests.workflow_helpers import (
    ENV,
    REPO,
    TINY,
    dvc,
    make_project,
    planned_jobs,
    snakemake,
    tiny_params,
    write_params,
)

SCORE_METHODS = ["el2n", "grand-inverse", "forgetting", "moso-mid"]


def every_kind_of_rule() -> dict:
    """Cluster and score methods (both surrogates), an extra run, two seeds, the skew arms."""
    return tiny_params(
        study={
            **TINY["study"],
            "methods": ["random", "cluster-furthest", *SCORE_METHODS],
            "extra_runs": ["cluster-balanced_r0.0"],
        },
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("agreement"), every_kind_of_rule())


@pytest.fixture(scope="module")
def stages(project):
    return yaml.safe_load((project / "dvc.yaml").read_text())["stages"]


@pytest.fixture(scope="module")
def jobs(project):
    return planned_jobs(project)


def outs(stage: dict) -> set[str]:
    return {
        next(iter(out)) if isinstance(out, dict) else out
        for key in ("outs", "metrics", "plots")
        for out in stage.get(key, [])
    }


def test_committed_dvc_yaml_is_the_generated_one():
    result = subprocess.run(
        [sys.executable, "-m", "diffprune", "dvc-yaml", "--check"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"


def test_one_stage_per_job_or_per_seeds_with_exactly_what_they_read(stages, jobs):
    """A job's stage is its own, or its grid point's and rule's for all seeds (run side by side)."""
    by_out = {out: name for name, stage in stages.items() for out in outs(stage)}
    assert set(by_out) == {out for job in jobs for out in job["output"]}
    members: dict[str, list[dict]] = {}
    for job in jobs:
        name = by_out[job["output"][0]]
        assert {by_out[out] for out in job["output"]} == {name}
        members.setdefault(name, []).append(job)
    for name, group in members.items():
        stage, rule = stages[name], group[0]["rule"]
        assert {job["rule"] for job in group} == {rule}
        assert name.startswith(rule + "_") or name == rule
        assert len({job["wildcards"].get("seed") for job in group}) == len(group), name
        script = f"workflow/scripts/{rule}.py"
        code = library_modules(script, REPO)
        assert stage["deps"][0] == script
        assert set(stage["deps"]) == {script, *code, *(f for job in group for f in job["input"])}
        words = shlex.split(stage["cmd"])
        assert words[0] == f"{RUN_ENV}={SEEDS if len(group) > 1 else ONE_JOB}", name
        # seeds side by side, one single-thread job per core asked for
        assert words[words.index("--cores") + 1] == (str(len(group)) if len(group) > 1 else "all")
        assert words[-len(group) - 2 : -len(group)] == [rule, "--"]
        assert sorted(words[-len(group) :]) == sorted(job["output"][0] for job in group)
    assert len(members["train_full"]) == len(TINY["study"]["seeds"]) > 1


def test_a_score_selection_depends_on_its_score_file_only(stages):
    deps = stages["select_el2n_r0p5"]["deps"]
    assert str(paths.scores("el2n")) in deps
    assert str(paths.scores("grand")) not in deps
    assert not [d for d in deps if d.startswith("data/surrogates")]
    assert not [d for d in deps if d.startswith(str(paths.EVIDENCE / "clusters"))]
    assert stages["select_cluster-furthest_r0p5"]["params"] == ["select", "cluster"]
    assert str(paths.scores("el2n")) not in stages["select_cluster-furthest_r0p5"]["deps"]


def test_params_are_what_the_rules_read(stages):
    assert stages["train_full"]["params"] == ["train"]
    assert stages["sample_full"]["params"] == ["sample", "train.device"]
    assert stages["evaluate_full"]["params"] == ["evaluate", "train.resolution"]
    assert stages["surrogate_moso"]["params"] == ["train", "scores"]
    assert "diffprune/features.py" in stages["evaluate_full"]["deps"]
    assert "diffprune/features.py" not in stages["train_full"]["deps"]


def test_outputs_persist_and_results_are_git_tracked(stages):
    train = stages["train_random_r0p5"]
    assert train["outs"][1] == {"data/runs/random_r0.5/s1/model": {"persist": True}}
    assert train["plots"][1] == {"data/runs/random_r0.5/s1/dvclive": {"persist": True}}
    evaluate = stages["evaluate_random_r0p5"]
    assert evaluate["metrics"][1] == {
        "results/metrics/random_r0.5/s1.json": {"persist": True, "cache": False}
    }
    assert stages["classifier"]["metrics"] == [
        {"results/classifier.json": {"persist": True, "cache": False}}
    ]
    for name, stage in stages.items():
        for key in ("outs", "metrics", "plots"):
            for out in stage.get(key, []):
                ((path, options),) = out.items()
                assert options["persist"] is True, (name, path)
                assert options.get("cache", True) is (not path.startswith("results/")), path


def test_commands_hold_only_quoted_concrete_paths(stages):
    for name, stage in stages.items():
        assert "${" not in stage["cmd"] and ";" not in stage["cmd"], name
        words = shlex.split(stage["cmd"])
        assert words[0] in (f"{RUN_ENV}={ONE_JOB}", f"{RUN_ENV}={SEEDS}"), name
        assert words[1] == "snakemake", name
        assert shlex.join(words[1:]) == stage["cmd"].split(" ", 1)[1], name


def test_a_shell_in_params_is_refused_before_any_shell(tmp_path):
    root = make_project(tmp_path / "p", tiny_params())
    params = tiny_params(report={**tiny_params()["report"], "dir": "results; touch X"})
    write_params(root, params)
    result = subprocess.run(
        [sys.executable, "-m", "diffprune", "dvc-yaml"],
        cwd=root,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "report.dir" in result.stderr and "results; touch X" in result.stderr
    assert not (root / "X").exists()


def test_bad_input_found_while_planning_is_one_line(tmp_path):
    (tmp_path / "images" / "test").mkdir(parents=True)  # a test/ folder without train/
    root = make_project(tmp_path / "p", tiny_params())
    data = {**tiny_params()["data"], "source": "imagefolder", "path": str(tmp_path / "images")}
    evaluate = {**tiny_params()["evaluate"], "features": ["efficientnet-lite0"]}
    report = {
        **tiny_params()["report"],
        "metric": "fd_efficientnet_lite0",
        "metrics": ["kid_efficientnet_lite0"],
        "claims": {
            **tiny_params()["report"]["claims"],
            "novelty_metric": "novelty_mean_efficientnet_lite0",
        },
    }
    write_params(root, tiny_params(data=data, evaluate=evaluate, report=report, skew={"arms": []}))
    result = subprocess.run(
        [sys.executable, "-m", "diffprune", "dvc-yaml"], cwd=root, env=ENV, capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]  # after Snakemake's "Building DAG of jobs..."
    assert last.startswith("diffprune: error: data.path = ") and "no train/ folder" in last
    assert "Traceback" not in result.stderr, result.stderr


def fill_with_placeholders(root: Path) -> None:
    """Every output as a small file (a folder: one file in it), then both engines told they are
    current: `snakemake --touch`, `dvc commit --force`, `snakemake --touch` (make run's tail)."""
    for job in planned_jobs(root):
        for out in job["output"]:
            path = root / out
            if job["rule"] in ("train", "surrogate", "autoencoder") or path.suffix == "":
                path.mkdir(parents=True, exist_ok=True)
                (path / "placeholder").write_text(out)
                (path / ".snakemake_timestamp").touch()  # as Snakemake leaves a folder output
            elif path.suffix == ".parquet":  # read while planning (diffprune.manifest)
                path.parent.mkdir(parents=True, exist_ok=True)
                pd.DataFrame({"sample_id": [0], "keep": [True]}).to_parquet(path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(out)
    snakemake(root, "--touch", "--quiet")
    dvc(root, "commit", "--force", "--quiet")
    snakemake(root, "--touch", "--quiet")
    assert planned_jobs(root) == []
    assert json.loads(dvc(root, "status", "--json").stdout) == {}


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """One project for the tests below; each puts back what it changes."""
    root = make_project(tmp_path_factory.mktemp("filled"), tiny_params())
    fill_with_placeholders(root)
    return root


def test_changing_the_evaluation_code_plans_the_same_jobs_in_both_engines(filled):
    module = filled / "diffprune" / "evaluate.py"
    original = module.read_text()
    module.write_text(original + "\n# changed\n")
    try:
        planned = {job["rule"] for job in planned_jobs(filled)}
        changed = set(json.loads(dvc(filled, "status", "--json").stdout))
        dry = dvc(filled, "repro", "--dry").stdout
    finally:
        module.write_text(original)
    assert planned == {"evaluate", "report", "skew_report"}
    running = {line.split("'")[1] for line in dry.splitlines() if "Running stage" in line}
    assert changed == running
    assert {name.split("_")[0] for name in running} == {"evaluate"}
    # DVC decides the downstream report stages by content once these have run


def test_a_bad_param_through_dvc_leaves_the_model_in_place(filled):
    model = filled / paths.model("full", 0) / "placeholder"
    params = tiny_params()
    params["train"]["lr"] = -1.0
    write_params(filled, params)
    try:
        result = dvc(filled, "repro", "train_full", check=False)
    finally:
        write_params(filled, tiny_params())
    assert result.returncode != 0
    assert "train.lr" in result.stdout + result.stderr
    assert model.read_text() == str(paths.model("full", 0))


def test_a_stale_dvc_yaml_is_refused(filled):
    params = tiny_params(study={**TINY["study"], "ratios": [0.5, 0.75]})
    write_params(filled, params)
    try:
        result = dvc(filled, "repro", "report", check=False)
        dry = subprocess.run(
            [str(Path(sys.executable).parent / "snakemake"), "-n"],
            cwd=filled,
            env={**ENV, RUN_ENV: "1"},
            capture_output=True,
            text=True,
        )
    finally:
        write_params(filled, tiny_params())
    assert result.returncode != 0
    assert STALE in result.stdout + result.stderr
    assert dry.returncode != 0 and STALE in dry.stdout + dry.stderr


def test_only_the_grid_makes_dvc_yaml_stale():
    """`dvc exp run -S train.lr=...` keeps the job list; a new ratio or arm does not."""
    params = tiny_params()
    base = shape_digest(params)
    assert shape_digest({**params, "train": {**params["train"], "lr": 0.1}}) == base
    for section, key, value in [
        ("study", "ratios", [0.5, 0.75]),
        ("skew", "arms", ["random"]),
        ("evaluate", "features", ["classifier"]),
        ("train", "space", "latent"),
        ("report", "dir", "results/other"),
        ("data", "source", "imagefolder"),
        ("data", "path", "/some/images"),
    ]:
        changed = {**params, section: {**params[section], key: value}}
        assert shape_digest(changed) != base, f"{section}.{key}"


def test_an_image_folder_source_is_a_dvc_dep_of_its_store(tmp_path):
    """Snakemake follows the folder's fingerprint param; DVC hashes the folder the split reads."""
    from PIL import Image

    images = tmp_path / "images"
    for c, name in enumerate(("boots", "coats")):
        for i in range(6):
            (images / name).mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 40 * c + i).save(images / name / f"{i}.png")
    params = tiny_params(
        data={**TINY["data"], "source": "imagefolder", "path": str(images), "test_path": None,
              "train_size": None, "test_size": None},
    )  # fmt: skip
    root = make_project(tmp_path / "p", params)
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for split in ("train", "test"):
        assert str(images) in stages[f"download_{split}"]["deps"]
        assert stages[f"download_{split}"]["params"] == ["data"]


def test_a_lazily_loaded_subpackage_counts_as_all_of_its_modules():
    """diffprune.data loads its modules on first use, which no AST shows: training must still
    depend on diffprune/data/tensors.py, where images become model inputs."""
    modules = library_modules("workflow/scripts/train.py", root=REPO)
    assert "diffprune/data/tensors.py" in modules and "diffprune/train.py" in modules
    assert "diffprune/evaluate.py" not in library_modules(
        "workflow/scripts/reference.py", root=REPO
    )
