"""The tiny study through a real one-node SLURM cluster (`make slurm-up`, tests/slurm/cluster.sh)
and workflow/profiles/slurm-local: every job goes through sbatch and into the accounting with its
rule's requests, the results equal a local run's, a training job cancelled with scancel resumes
from its checkpoint, and GPU requests are placed on (or refused by) a node with two fake GPUs.

Needs root and apt-get (the cluster is installed from Debian packages); skipped otherwise."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from diffprune import paths
from tests.script_helpers import wait_for
from tests.workflow_helpers import BIN, ENV, REPO, make_project, run, tiny_params

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
PROFILE = "workflow/profiles/slurm-local"
RUN, SEED = "random_r0.5", 0
# The smallest study over the tests' tiny params: one run, one seed, classifier features only.
# Training is long enough (steps) to be cancelled between two checkpoints; it logs at every
# checkpoint, since a logged loss is the mean since the last log, and after a resume that window
# starts at the checkpoint.
OVERLAY = {
    "study": {"methods": ["random"], "seeds": [SEED], "extra_runs": [], "baseline": False},
    "skew": {"arms": []},
    "evaluate": {"features": ["classifier"]},
    "report": {"metrics": ["kid_classifier"]},
    "train": {"steps": 200, "checkpoint_every": 25, "log_every": 25},
}


def unavailable() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if os.geteuid() != 0:
        return "SLURM test: needs root (the cluster is installed with apt and runs as root)"
    if shutil.which("apt-get") is None:
        return "SLURM test: needs apt-get to install slurmctld, slurmd, slurmdbd, munge, mariadb"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "SLURM test: snakemake-executor-plugin-slurm is not installed (make setup)"
    return None


def test_without_root_the_slurm_tests_say_why(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert (
        unavailable()
        == "SLURM test: needs root (the cluster is installed with apt and runs as root)"
    )
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "needs apt-get" in unavailable()


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node cluster: reused when already up, else started here and stopped afterwards."""
    if reason := unavailable():
        pytest.skip(reason)
    if subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0:
        yield
        return
    run([str(CLUSTER), "up"], REPO)
    yield
    run([str(CLUSTER), "down"], REPO)


def snakemake_bg(root: Path, name: str, *args: str) -> subprocess.Popen:
    """Snakemake in the background, its output in `name`.out (a pipe nobody reads would block)."""
    with open(root / f"{name}.out", "a") as out:
        return subprocess.Popen(
            [str(BIN / "snakemake"), "--configfile", "overlay.yaml", *args],
            cwd=root,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def finish(process: subprocess.Popen, root: Path, name: str, *, ok: bool = True) -> None:
    code = process.wait(timeout=600)
    assert (code == 0) == ok, f"{name}: exit {code}\n{(root / f'{name}.out').read_text()[-4000:]}"


def project(root: Path) -> Path:
    make_project(root, tiny_params())
    (root / "overlay.yaml").write_text(yaml.safe_dump(OVERLAY))
    return root


def accounting(root: Path, since: str) -> list[dict]:
    """Every SLURM job submitted in `root` since `since`, from the accounting database (sacct)."""
    fields = "JobIDRaw,Comment,State,ReqCPUS,ReqMem,Timelimit,ReqTRES,WorkDir"
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-S", since, "-o", fields],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [dict(zip(fields.split(","), line.split("|"), strict=True)) for line in out.splitlines()]
    return [row for row in rows if Path(row["WorkDir"]) == root]


def planned(root: Path) -> list[dict]:
    """Snakemake's plan (dry run) with the profile: each job's SLURM comment (rule and wildcard
    values, as the executor writes it), threads and resources. `all` runs on the submit host."""
    out = run(
        [str(BIN / "snakemake"), "--profile", PROFILE, "--configfile", "overlay.yaml", "-n"], root
    ).stdout
    jobs = []
    for block in re.split(r"\n(?=rule \w+:)", out):
        if not (head := re.match(r"rule (\w+):", block)) or head[1] == "all":
            continue
        threads = re.search(r"^\s+threads: (\d+)", block, re.M)
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        values = [item.split("=", 1)[1] for item in wildcards[1].split(", ")] if wildcards else []
        resources = dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"resources: (.*)", block)[1]))
        comment = f"rule_{head[1]}" + (f"_wildcards_{'_'.join(values)}" if values else "")
        jobs.append({"comment": comment, "threads": int(threads[1]) if threads else 1, **resources})
    return jobs


def slurm_jobs(root: Path, rule: str) -> list[str]:
    """Queued or running SLURM job ids of `rule` started in `root` (squeue: id|comment|workdir)."""
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i|%k|%Z"], capture_output=True, text=True, check=True
    ).stdout
    return [
        job
        for job, comment, workdir in (line.split("|") for line in out.splitlines())
        if comment.startswith(f"rule_{rule}_wildcards_") and Path(workdir) == root
    ]


def cancel_training(root: Path) -> str:
    """scancel the training job once it has written a checkpoint; returns its SLURM job id."""
    latest = root / paths.checkpoints(RUN, SEED) / "latest.pt"
    wait_for(latest.exists, timeout=400, what=f"the training job's first checkpoint {latest}")
    (job,) = slurm_jobs(root, "train")
    subprocess.run(["scancel", job], check=True)
    return job


@pytest.fixture(scope="module")
def study(slurm_cluster, tmp_path_factory) -> dict:
    """The tiny study run locally and, beside it, through SLURM with its training job cancelled
    mid-run and Snakemake rerun; returns both projects, the plan and the cancelled job id."""
    local = project(tmp_path_factory.mktemp("local"))
    cluster = project(tmp_path_factory.mktemp("slurm"))
    plan = planned(cluster)
    since = time.strftime("%Y-%m-%dT%H:%M:%S")  # sacct -S: this study's jobs only
    local_run = snakemake_bg(local, "local", "--cores", "2")
    first = snakemake_bg(cluster, "slurm", "--profile", PROFILE)
    cancelled = cancel_training(cluster)
    finish(first, cluster, "slurm", ok=False)  # the cancelled job failed the first run
    finish(snakemake_bg(cluster, "slurm-rerun", "--profile", PROFILE), cluster, "slurm-rerun")
    finish(local_run, local, "local")
    return {"local": local, "slurm": cluster, "plan": plan, "cancelled": cancelled, "since": since}


def minutes(limit: str) -> int:
    """sacct's Timelimit ([D-]HH:MM:SS) in minutes."""
    days, _, clock = limit.rpartition("-")
    hours, mins, _ = map(int, clock.split(":"))
    return int(days or 0) * 1440 + hours * 60 + mins


@pytest.mark.slow  # the study, locally and through SLURM (setup: a few minutes)
def test_every_job_was_submitted_with_its_rules_requests(study):
    """One SLURM job per Snakemake job (plus the cancelled training), each in the accounting
    with the CPUs (threads), memory (mem_mb), time (runtime) and GPUs its rule asks for."""
    jobs = accounting(study["slurm"], study["since"])
    cancelled = [job for job in jobs if job["JobIDRaw"] == study["cancelled"]]
    assert [job["State"] for job in cancelled] == ["CANCELLED by 0"], cancelled
    done = [job for job in jobs if job["JobIDRaw"] != study["cancelled"]]
    assert all(job["State"] == "COMPLETED" for job in done), done
    assert sorted(job["Comment"] for job in done) == sorted(job["comment"] for job in study["plan"])
    by_comment = {job["Comment"]: job for job in done}
    for want in study["plan"]:
        got = by_comment[want["comment"]]
        assert int(got["ReqCPUS"]) == want["threads"], (want, got)
        assert got["ReqMem"] == f"{want['mem_mb']}M", (want, got)
        assert minutes(got["Timelimit"]) == int(want["runtime"]), (want, got)
        gpus = re.search(r"gres/gpu=(\d+)", got["ReqTRES"])
        assert (int(gpus[1]) if gpus else 0) == int(want.get("gpu", 0)), (want, got)
    assert any("gres/gpu=1" in job["ReqTRES"] for job in done)  # device auto: train, sample


@pytest.mark.slow  # the study, locally and through SLURM (setup: a few minutes)
def test_cancelled_training_resumed_from_its_checkpoint(study):
    log = (study["slurm"] / paths.log("train", f"{RUN}_s{SEED}")).read_text()
    steps = [int(step) for step in re.findall(r"resuming from \S+ at step (\d+)", log)]
    assert steps and 0 < steps[-1] < OVERLAY["train"]["steps"], log[-2000:]
    summary = json.loads((study["slurm"] / paths.model(RUN, SEED) / "train.json").read_text())
    assert summary["resumed_from_step"] == steps[-1]


SHIM = """#!{python}
# records the executor's sbatch arguments (one JSON list a line) instead of submitting the job
import json, sys
with open({calls!r}, "a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(1)
"""


def recorded_sbatch(root: Path, tmp: Path, train: dict) -> list[str]:
    """The sbatch call the executor makes for the training job under `train` overrides, recorded
    by an `sbatch` placed first on PATH (nothing is submitted)."""
    shim, calls = tmp / "bin", tmp / "calls"
    shim.mkdir()
    (shim / "sbatch").write_text(SHIM.format(python=BIN / "python", calls=str(calls)))
    (shim / "sbatch").chmod(stat.S_IRWXU)
    (root / "gpus.yaml").write_text(yaml.safe_dump({"train": train}))
    target = str(paths.model(RUN, SEED))
    cmd = [str(BIN / "snakemake"), "--profile", PROFILE, "--configfile", "overlay.yaml"]
    cmd += ["gpus.yaml", "--forcerun", "train", "--until", "train", "--", target]
    env = {**ENV, "PATH": f"{shim}{os.pathsep}{ENV['PATH']}"}
    subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert calls.exists(), "the executor never called sbatch"
    (call,) = [args for args in map(json.loads, calls.read_text().splitlines())]
    return call


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "accepted"), [(2, True), (3, False)])
def test_gpu_requests_meet_a_node_with_two_gpus(study, tmp_path, processes, accepted):
    """train.num_processes: N asks for N GPUs (the `gpu` resource -> sbatch --gpus=N); the node
    with gres gpu:2 accepts 2 and refuses 3 (sbatch --test-only: placed, not run)."""
    root = tmp_path / "project"  # a copy: a failed submission removes the outputs it would write
    shutil.copytree(study["slurm"], root, symlinks=True)
    args = recorded_sbatch(root, tmp_path, {"num_processes": processes, "batch_size": 12})
    assert f"--gpus={processes}" in args and not any("--gres" in arg for arg in args), args
    test = subprocess.run(
        ["sbatch", "--test-only", *args], cwd=root, capture_output=True, text=True
    )
    assert (test.returncode == 0) == accepted, test.stderr
    expected = "to start at" if accepted else "Requested node configuration is not available"
    assert expected in test.stderr, test.stderr


# What differs between two runs of the same study: how long things took, free memory, whether the
# training was resumed, and the cost plot drawn from those times.
MEASURED = re.compile(r"seconds$|per_second$|^mfu|^data_free_bytes$|^resumed_from_step$")
PLOTS_OF_TIME = {"results/plots/cost.png"}


def unmeasured(value):
    """`value` (JSON) without the measured keys, at every depth."""
    if isinstance(value, dict):
        return {k: unmeasured(v) for k, v in value.items() if not MEASURED.search(k)}
    if isinstance(value, list):
        return [unmeasured(v) for v in value]
    return value


def outputs(root: Path) -> set[str]:
    found = {p for d in ("data", "results") for p in (root / d).rglob("*") if p.is_file()}
    return {str(p.relative_to(root)) for p in found if "checkpoints" not in p.parts}


def same_result(a: Path, b: Path) -> bool:
    """Same bytes, or (files that record times) the same content once the times are dropped."""
    if a.read_bytes() == b.read_bytes():
        return True
    if a.suffix == ".json":
        return unmeasured(json.loads(a.read_text())) == unmeasured(json.loads(b.read_text()))
    if a.suffix == ".csv":
        x, y = pd.read_csv(a), pd.read_csv(b)
        return x.drop(columns=x.filter(regex=MEASURED.pattern)).equals(
            y.drop(columns=y.filter(regex=MEASURED.pattern))
        )
    if a.suffix == ".pt":  # the classifier: weights, and meta with its training time
        x, y = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
        weights = all(torch.equal(x["state_dict"][k], y["state_dict"][k]) for k in x["state_dict"])
        return weights and unmeasured(x["meta"]) == unmeasured(y["meta"])
    return False


@pytest.mark.slow  # the study, locally and through SLURM (setup: a few minutes)
def test_results_equal_the_local_runs(study):
    """Same threads per job (max-threads 2 = --cores 2) and seeds: the SLURM run, its training
    cancelled and resumed, writes the local run's bytes; only measured times differ."""
    local, cluster = study["local"], study["slurm"]
    assert outputs(cluster) == outputs(local)
    differ = [
        name
        for name in sorted(outputs(local) - PLOTS_OF_TIME)
        if not same_result(cluster / name, local / name)
    ]
    assert not differ, differ
    assert len(outputs(local)) > 30  # store, manifest, model, samples, metrics, report
