"""Run the real Snakefile and dvc.yaml on a tiny copy of the study in a temporary folder."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}

FIXED_DATE = "2026-01-01T00:00:00+00:00"
TINY = {
    "data": {"train_size": 120, "test_size": 60},
    "embed": {"image_size": 32, "batch_size": 64},
    "cluster": {"k": 3, "iterations": 10},
    "study": {
        # cluster-balanced at p=0.5 is tested through its script (test_scripts); the study keeps
        # the paper's balanced rule (p=0) as an extra run: every train/sample job costs ~8 s of
        # imports (diffusers), so each grid point the study drops saves about a minute
        "methods": ["random", "cluster-furthest"],
        "ratios": [0.5],
        "seeds": [0, 1],
        "extra_runs": ["cluster-balanced_r0.0"],
    },
    "train": {
        "resolution": 8,
        "block_channels": [8, 16],
        "steps": 4,
        "batch_size": 8,
        "checkpoint_every": 2,
        "log_every": 1,
    },
    "sample": {"num_samples": 16, "steps": 2, "batch_size": 16, "grid_size": 4},
    "classifier": {"epochs": 1, "batch_size": 32},
    "skew": {
        "arms": ["cluster-balanced", "label-balanced"],
        "size": 60,
        "keep": 30,
        "k": 3,
        "minority_share": 0.1,
    },
    "evaluate": {"image_size": 32, "batch_size": 64},
}


def tiny_params(**sections) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in (TINY | sections).items():
        params[section] = {**params[section], **values}
    return copy.deepcopy(params)


def make_project(root: Path, params: dict) -> Path:
    """A copy of the workflow definition (not the data) with its own params.yaml, git and DVC."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    (root / "profiles").symlink_to("workflow/profiles")  # Snakemake's implicit workflow profile
    for name in ("workflow", ".dvc", "diffprune"):
        shutil.copytree(
            REPO / name, root / name, ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__")
        )
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    write_params(root, params)
    generate_dvc_yaml(root)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "ci@example.com"],
        ["git", "config", "user.name", "ci"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "study definition"],
    ):
        # fixed dates: two projects of the same files have the same commit, so the code version
        # that artifacts record (io.code_version) is the same too
        run(cmd, root, env={"GIT_AUTHOR_DATE": FIXED_DATE, "GIT_COMMITTER_DATE": FIXED_DATE})
    return root


def generate_dvc_yaml(root: Path) -> None:
    """`make dvc.yaml` in the project: its own Snakefile and params give its own stages."""
    run([sys.executable, "-m", "diffprune", "dvc-yaml"], root)


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run(
    cmd: list[str], cwd: Path, *, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**ENV, **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def snakemake(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "snakemake"), "--cores", "2", *args], root, check=check)


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], root, check=check)


def planned_jobs(root: Path) -> list[dict]:
    """Jobs a dry run would execute: rule, inputs, outputs and wildcards of each."""
    result = snakemake(root, "--dry-run")
    text = result.stdout + result.stderr
    jobs, job = [], None
    for line in text.splitlines():
        if match := re.match(r"^(?:local)?rule (\w+):$", line.strip()):
            job = {"rule": match[1], "input": [], "output": [], "wildcards": {}}
            jobs.append(job)
        elif job is not None and (match := re.match(r"^\s+(input|output|wildcards): (.*)$", line)):
            key, value = match[1], match[2]
            if key == "wildcards":
                job[key] = dict(item.split("=", 1) for item in value.split(", "))
            else:
                job[key] = value.split(", ")
    return [job for job in jobs if job["rule"] != "all"]
