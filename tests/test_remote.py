"""Sharing and restoring: the tiny study pushed to the DVC remote, pulled into a fresh git clone,
and a queued DVC experiment run from the pulled cache."""

import json
import shlex
import time

import pytest

from diffprune import paths
from tests.workflow_helpers import (
    REPO,
    TINY,
    dvc,
    generate_dvc_yaml,
    make_project,
    planned_jobs,
    run,
    snakemake,
    tiny_params,
    write_params,
)

pytestmark = pytest.mark.slow
# One grid point, one seed, no fairness arms: every DVC stage type but train/sample/evaluate once.
PARAMS = tiny_params(
    study={**TINY["study"], "methods": ["cluster-furthest"], "seeds": [0], "extra_runs": []},
    skew={**TINY["skew"], "arms": []},
)
RUN = "cluster-furthest_r0.5"


def make_recipe(target: str) -> list[list[str]]:
    """The commands of a Makefile target, with $(BIN)/ dropped (the helpers put BIN on PATH)."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(shlex.split(line.strip().replace("$(BIN)/", "")))
    return recipe


def run_recipe(target: str, root) -> None:
    for cmd in make_recipe(target):
        run(cmd, root)


def clone(origin, dest):
    run(["git", "clone", "-q", str(origin), str(dest)], origin.parent)
    run(["git", "config", "user.email", "ci@example.com"], dest)
    run(["git", "config", "user.name", "ci"], dest)
    return dest


def data_files(root) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted((root / "data").rglob("*"))
        if path.is_file() and path.name != ".gitignore"
    }


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """The tiny study run by Snakemake, recorded as `make run` does, committed, then `make push`
    to the default remote (.dvc/config: ../diffprune-dvc-remote, beside this checkout)."""
    root = make_project(tmp_path_factory.mktemp("remote") / "origin", PARAMS)
    snakemake(root)
    dvc(root, "commit", "--force", "--quiet")
    snakemake(root, "--touch", "--quiet")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny study"], root)
    run_recipe("push", root)
    return root


@pytest.fixture(scope="module")
def pulled(origin):
    """A fresh git clone beside the origin (so the same default remote), after `make pull`."""
    root = clone(origin, origin.parent / "clone")
    assert not (root / "data").exists()
    run_recipe("pull", root)
    return root


def test_default_remote_is_a_folder_beside_the_checkout(origin):
    remote = origin.parent / "diffprune-dvc-remote"
    assert dvc(origin, "config", "core.remote").stdout.strip() == "storage"
    listed = dvc(origin, "remote", "list").stdout.split()
    assert listed[:3] == ["storage", str(remote), "(default)"]
    assert any((remote / "files" / "md5").iterdir())
    assert not (remote / "runs").exists()  # persistent outputs: no run cache to send
    # docs/snakemake-and-dvc.md's switch to S3 for one user: .dvc/config.local, not .dvc/config
    config = (origin / ".dvc" / "config").read_bytes()
    dvc(origin, "remote", "modify", "--local", "storage", "url", "s3://bucket/path")
    try:
        assert dvc(origin, "remote", "list").stdout.split()[:2] == ["storage", "s3://bucket/path"]
        assert (origin / ".dvc" / "config").read_bytes() == config
    finally:
        (origin / ".dvc" / "config.local").unlink()


def test_pull_restores_every_artifact_and_nothing_reruns(origin, pulled):
    assert "Data and pipelines are up to date" in dvc(pulled, "status").stdout
    assert planned_jobs(pulled) == []
    original = data_files(origin)
    assert str(paths.manifest(RUN, 0)) in original
    assert data_files(pulled) == original


def test_pull_without_touch_leaves_snakemake_rerunning(origin):
    """Why `make pull` runs `snakemake --touch`: pulled files carry the times of the pull."""
    root = clone(origin, origin.parent / "clone-no-touch")
    dvc(root, "pull", "--quiet")
    assert "Data and pipelines are up to date" in dvc(root, "status").stdout
    assert planned_jobs(root) != []


def test_a_personal_remote_overrides_the_default(origin, tmp_path):
    elsewhere = tmp_path / "bucket"
    dvc(origin, "remote", "add", "-d", "--local", "mine", str(elsewhere))
    try:
        dvc(origin, "push", "--quiet")
    finally:
        (origin / ".dvc" / "config.local").unlink()
    root = clone(origin, tmp_path / "clone")
    dvc(root, "remote", "add", "-d", "--local", "mine", str(elsewhere))
    dvc(root, "pull", "--quiet")
    assert data_files(root) == data_files(origin)


def test_queued_experiment_runs_from_the_pulled_cache(origin):
    """A queued experiment runs in a temporary copy of the git-tracked files; its unchanged stages
    are checked out from the local cache (filled by `make pull`), so only the new ratio runs.
    A new ratio changes the grid: `make dvc.yaml` first, then queue (the queue takes the
    workspace's params.yaml and dvc.yaml)."""
    root = clone(origin, origin.parent / "lab")
    run_recipe("pull", root)
    write_params(root, {**PARAMS, "study": {**PARAMS["study"], "ratios": [0.5, 0.75]}})
    generate_dvc_yaml(root)
    queued = dvc(root, "exp", "run", "--queue").stdout
    run(["git", "checkout", "--", "params.yaml", "dvc.yaml"], root)
    name = queued.split("Queued experiment '")[1].split("'")[0]
    dvc(root, "queue", "start")
    deadline = time.monotonic() + 600
    while "Success" not in (status := dvc(root, "queue", "status").stdout):
        assert "Failed" not in status, dvc(root, "queue", "logs", name, check=False).stdout
        assert time.monotonic() < deadline, status
        time.sleep(5)
    logs = dvc(root, "queue", "logs", name).stdout
    assert "Running stage 'train_cluster-furthest_r0p75'" in logs
    assert "Stage 'embed' didn't change, skipping" in logs
    assert "Running stage 'train_cluster-furthest_r0p5'" not in logs
    assert "Running stage 'train_full'" not in logs

    shown = dvc(root, "exp", "show", "--md").stdout
    header, row = shown.splitlines()[0], next(r for r in shown.splitlines() if f"[{name}]" in r)
    new_metrics = str(paths.metrics("cluster-furthest_r0.75", 0))
    assert f"{new_metrics}:fd_classifier" in header and "Success" in row

    assert not (root / new_metrics).exists()
    dvc(root, "exp", "apply", name)
    metrics = json.loads((root / new_metrics).read_text())
    columns = [cell.strip() for cell in header.split("|")]
    cells = [cell.strip() for cell in row.split("|")]
    assert cells[columns.index(f"{new_metrics}:fd_classifier")] == f"{metrics['fd_classifier']:.5g}"
    assert (root / paths.manifest("cluster-furthest_r0.75", 0)).exists()
    assert "Data and pipelines are up to date" in dvc(root, "status").stdout
