"""dvc.yaml and the Snakefile must describe the same steps: same outputs, inputs and params."""

from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

from tests.workflow_helpers import REPO, make_project, planned_jobs, tiny_params

# Log files and the training-curve folder are Snakemake bookkeeping that DVC declares as plots.
SNAKEMAKE_ONLY = ("logs/",)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    # Every kind of rule: cluster and score methods (both surrogates), an extra run, two seeds.
    methods = ["random", "cluster-furthest", "el2n", "grand-inverse", "forgetting", "moso-mid"]
    params = tiny_params(
        study={
            **tiny_params()["study"],
            "methods": methods,
            "seeds": [0, 1],
            "extra_runs": ["cluster-balanced_r0.0"],
        },
        scores={
            **tiny_params()["scores"],
            "names": ["el2n", "grand", "forgetting", "moso"],
            "surrogates": ["full", "moso"],
        },
    )
    return make_project(tmp_path_factory.mktemp("agreement"), params)


@pytest.fixture(scope="module")
def jobs(project):
    return planned_jobs(project)


@pytest.fixture(scope="module")
def stages(project):
    with Repo(str(project)) as repo:
        return [
            {
                "name": stage.addressing,
                "cmd": stage.cmd,
                "deps": {d.def_path for d in stage.deps if d.def_path != "params.yaml"},
                "outs": {o.def_path for o in stage.outs},
                "params": {p for dep in stage.params for p in dep.params},
            }
            for stage in repo.index.stages
        ]


def inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def covered(path: str, declared: set[str]) -> bool:
    return any(inside(path, d) for d in declared)


def stage_jobs(stage, jobs):
    """The Snakemake jobs that produce a DVC stage's outputs (files, or files in its folders)."""
    return [job for job in jobs if any(covered(out, stage["outs"]) for out in job["output"])]


def test_every_snakemake_output_is_a_dvc_output(stages, jobs):
    dvc_outs = set().union(*(stage["outs"] for stage in stages))
    snakemake_outs = {out for job in jobs for out in job["output"]}
    assert {out for out in snakemake_outs if not covered(out, dvc_outs)} == set()
    assert {out for out in dvc_outs if not any(inside(o, out) for o in snakemake_outs)} == set()


def test_each_stage_runs_the_rules_that_make_its_outputs(stages, jobs):
    for stage in stages:
        made_by = stage_jobs(stage, jobs)
        assert made_by, f"{stage['name']}: no Snakemake job makes {stage['outs']}"
        outputs = {out for job in made_by for out in job["output"]}
        assert all(covered(out, stage["outs"]) for out in outputs), stage["name"]
        assert all(any(inside(o, out) for o in outputs) for out in stage["outs"]), stage["name"]
        for job in made_by:
            assert f" {job['rule']} " in stage["cmd"] + " ", (stage["name"], job["rule"])
        target = stage["cmd"].split(" -- ", 1)[1]
        assert covered(target, stage["outs"]), f"{stage['name']}: target {target} is no output"


def test_each_stage_depends_on_what_its_jobs_read(stages, jobs):
    for stage in stages:
        made_by = stage_jobs(stage, jobs)
        produced = {out for job in made_by for out in job["output"]}
        needed = {i for job in made_by for i in job["input"]} - produced
        missing = {path for path in needed if not covered(path, stage["deps"])}
        assert not missing, f"{stage['name']} lacks deps {missing}"


def test_each_stage_depends_on_its_rules_scripts(stages, jobs):
    rules_dir = REPO / "workflow" / "rules"
    scripts = {}
    for smk in rules_dir.glob("*.smk"):
        rule = None
        for line in smk.read_text().splitlines():
            if line.startswith("rule "):
                rule = line.split()[1].rstrip(":")
            elif line.strip().startswith('"../scripts/'):
                scripts[rule] = "workflow/scripts/" + Path(line.strip().strip('"')).name
    for stage in stages:
        for job in stage_jobs(stage, jobs):
            assert scripts[job["rule"]] in stage["deps"], (stage["name"], job["rule"])


def test_each_stage_tracks_the_params_its_rules_read(stages, jobs):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    rules_text = "".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    for stage in stages:
        for job in stage_jobs(stage, jobs):
            block = rules_text.split(f"rule {job['rule']}:", 1)[1].split("\nrule ", 1)[0]
            read = (
                _config_keys(block.split("params:", 1)[1].split("log:", 1)[0])
                if ("params:" in block)
                else set()
            )
            for key in read:
                assert key in stage["params"] or key.split(".")[0] in stage["params"], (
                    f"{stage['name']}: rule {job['rule']} reads {key}, DVC does not track it"
                )
            assert set(stage["params"]) <= {k for k in _flatten(params)} | set(params), stage


def _config_keys(text: str) -> set[str]:
    import re

    return {
        ".".join(parts for parts in match if parts)
        for match in re.findall(r'config\["(\w+)"\](?:\["(\w+)"\])?', text)
    }


def _flatten(params: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in params.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _flatten(value, prefix + key + ".")
    return keys
