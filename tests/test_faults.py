"""Fault matrix: each fault is injected for real, and the test checks what the workflow does.

- NaN loss (huge train.lr): the run is recorded as failed by train, sample, evaluate and the
  report, never as a number (test_nan_loss_*).
- Truncated artifact: a truncated checkpoint is moved aside and training starts over; a
  truncated model or store is refused by its loader (test_truncated_*). The DVC cache against a
  damaged workspace file: tests/test_dvc_cache.py.
- kill -9 of a training job: the rerun resumes and writes the same bytes as an uninterrupted run
  (test_kill_9_*).
- Bad params: every case of tests/test_bad_params.py stops Snakemake's own parse with one line
  naming key, value and what is allowed, before any job (test_bad_params_*).
- Corrupt checkpoint: moved aside with a warning; training resumes from previous.pt or starts
  over (test_corrupt_*); a second training of a running run refuses.
- Orphaned job (Snakemake killed with kill -9): the job stops itself (test_orphan*); every
  workflow script starts the watchdog through logs.setup (test_every_workflow_script_calls_*,
  test_a_job_set_up_by_logs_setup_stops_when_its_parent_dies).
- Two trainings of one checkpoint folder (autoencoder, surrogate, MoSo): the second refuses at
  once with one line naming the holder (test_every_training_refuses_while_another_process_*).
- Full disk (a real 2 MiB tmpfs, and a patched free-space figure): a memory-mapped store,
  embeddings, a checkpoint or an array write is one DiskFull line naming the path and the bytes
  needed and available, never SIGBUS or a serializer's traceback; latest.pt stays, no temporary
  is left (test_a_full_disk_*, test_a_checkpoint_on_a_full_disk_*, test_a_large_write_*); a
  killed writer's hidden temporaries go when the output is written again (test_temporaries_*).
- Concurrent engines: `dvc repro` during a Snakemake run refuses and deletes nothing
  (test_dvc_repro_during_a_snakemake_run_*).
- Params are data (issue 16): a params file or --configfile overlay with YTE templating, a key
  written twice or YAML aliases is refused with its line before Snakemake reads it, so no
  expression runs and nothing expands (test_unsafe_*, test_an_unsafe_overlay_*).
- Self-including image folder: data.path inside or holding a folder the workflow writes is refused
  at parse (test_an_image_folder_*).
- CUDA without CUDA: one line naming the key before any job when jobs run locally; the in-job
  check (cluster nodes) names the key too (test_cuda_without_cuda_*).
- Params edited while a DVC stage runs: the stage fails, so dvc.lock never records values its
  outputs were not made with (test_params_edited_while_a_dvc_stage_runs_*, test_changed_params_*).
- Degenerate clusters (identical images): clusters.json records clusters without distance spread
  and the share of tied distances, the log warns, and the report puts the warning at its top
  (test_identical_images_give_degenerate_clusters_*).
- Changed image folder: added, removed and replaced images rerun the store and what follows
  (tests/test_data_fingerprint.py); DVC hashes the folder as a dep of the store's stages
  (tests/test_dvc_agreement.py::test_an_image_folder_source_is_a_dvc_dep_of_its_store).
  An image replaced in place by other bytes of the same size with its mtime restored is caught
  with `data.fingerprint: content` and, as documented, not by the default stat mode
  (tests/test_data_fingerprint.py::test_content_mode_catches_a_same_size_replacement_*).
- Pixels of any PIL mode (float, 32-bit integer, 16-bit, 1, P, LA, RGBA, CMYK, YCbCr): scaled to
  8 bits by the rule of diffprune.data.decode.to_8bit, or refused and listed in bad_images with
  the reason, never stored wrong (test_every_pil_mode_*).
- Held-out images outside class folders beside training class folders: refused at plan time
  (the download rule's fingerprint) and by the store; unknown labels refused by the classifier's
  accuracy, never a false 0.0 (test_a_flat_heldout_folder_*).
- A Hugging Face label column of plain integers: classes "0".."K-1" (K = largest + 1), other
  values refused; a missing or non-integer column, or a conditional model without labels,
  refused at plan time from the local copy's dataset_info.json
  (tests/test_data_huggingface.py::test_an_integer_label_column_*).
- Truncated manifest: moved aside to manifest.parquet.corrupt while Snakemake plans, so its
  select job reruns before train replaces the model; the train and evaluate jobs refuse a
  damaged one in one line naming the path (test_a_truncated_manifest_*).
"""

from __future__ import annotations

import ast
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from diffprune import checkpoints, io, logs, paths
from diffprune.autoencoder_train import train_autoencoder
from diffprune.classifier import classifier_accuracy, train_classifier
from diffprune.config import validate_params
from diffprune.data import build, load_store
from diffprune.data.fingerprint import source_fingerprint
from diffprune.data.store import write_store as write_image_store
from diffprune.embed import embed_to_file
from diffprune.errors import ConfigError, DataError, DiskFull
from diffprune.evaluate import metrics_record
from diffprune.manifest import read_manifest
from diffprune.model_folder import load_model
from diffprune.report import collect, table
from diffprune.select import full_manifest
from diffprune.surrogate import train_moso_surrogates, train_surrogate
from diffprune.train import train
from tests.script_helpers import fake_snakemake, files, locked_elsewhere, run_script, wait_for
from tests.test_bad_params import CASES, shown_value, with_changes
from tests.test_scripts import PARAMS, write_store
from tests.workflow_helpers import ENV, REPO

TINY = {**PARAMS["train"], "steps": 80, "checkpoint_every": 10, "log_every": 10}
SEED = 0
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def images(n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def run(tmp_path: Path, name: str, **kwargs) -> dict:
    cfg = {**TINY, "steps": 9, "checkpoint_every": 3, "log_every": 1}
    kwargs = {"images": images(), "cfg": cfg, **kwargs}
    return train(
        seed=SEED,
        out_dir=tmp_path / name / "model",
        checkpoint_dir=tmp_path / name / "ckpt",
        progress=False,
        **kwargs,
    )


def same_weights(a: Path, b: Path) -> bool:
    return (a / WEIGHTS).read_bytes() == (b / WEIGHTS).read_bytes()


class Crash(RuntimeError):
    pass


def crash_at(crash_step: int):
    def on_snapshot(step, model, ema):
        if step == crash_step:
            raise Crash(f"simulated crash at step {step}")

    return on_snapshot


# --------------------------------------------------------------------------- NaN loss
def test_nan_loss_is_a_failed_run_in_every_stage_never_a_number(tmp_path):
    train_files = write_store(tmp_path / "store" / "train", np.repeat(np.arange(4), 3), seed=1)
    manifest = tmp_path / "manifest.parquet"
    io.save_parquet(manifest, pd.DataFrame({"sample_id": np.arange(12), "keep": True}))
    model = tmp_path / "model"
    run_script(
        "train",
        fake_snakemake(
            input=files(store=train_files, manifest=manifest),
            output=files(model=model, log_dir=tmp_path / "live"),
            params={"train": {**PARAMS["train"], "lr": 1e6}, "checkpoints": tmp_path / "ckpt"},
            wildcards={"run": "random_r0.5", "seed": SEED},
            log=tmp_path / "train.log",
        ),
    )
    training = io.load_json(model / "train.json")
    assert training["status"] == "failed" and "diverged" in training["failure"]
    assert sorted(p.name for p in model.iterdir()) == ["train.json"]  # no weights
    run_script(
        "sample",
        fake_snakemake(
            input=files(model=model),
            output=files(samples=tmp_path / "samples.npy", grid=tmp_path / "grid.png"),
            params={"sample": PARAMS["sample"], "device": "cpu"},
            wildcards={"run": "random_r0.5", "seed": SEED},
            log=tmp_path / "sample.log",
        ),
    )
    samples = np.load(tmp_path / "samples.npy")
    assert samples.size == 0

    selection = {
        "run": "random_r0.5", "method": "random", "ratio": 0.5, "seed": SEED, "n_total": 24,
        "n_kept": 12, "kept_fraction": 0.5, "compute": {"total_seconds": 0.0},
    }  # fmt: skip
    record = metrics_record(
        selection=selection,
        training=training,
        samples=samples,
        compute_metrics=lambda: pytest.fail("metrics computed for a failed run"),
    )
    assert record["status"] == "failed" and "fd_x" not in record
    paths = [tmp_path / "metrics" / "random_r0.5" / f"s{seed}.json" for seed in (0, 1)]
    io.save_json(paths[0], record)
    io.save_json(paths[1], {**record, "seed": 1, "status": "ok", "fd_x": 12.5, "failure": None})
    cell = table(collect(paths), "fd_x").loc["random", "0.5"]
    assert cell.startswith("12.5") and cell.endswith("(n=1), 1 failed")  # counted, not averaged


# --------------------------------------------------------------------------- truncated artifacts
def test_truncated_checkpoint_is_moved_aside_and_training_starts_over(tmp_path, caplog):
    clean = run(tmp_path, "clean")
    with pytest.raises(Crash):
        run(tmp_path, "x", snapshot_every=1, on_snapshot=crash_at(2))
    ckpt = tmp_path / "x" / "ckpt"
    assert not (ckpt / checkpoints.LATEST).exists()  # nothing before step 3
    with pytest.raises(Crash):
        run(tmp_path, "x", snapshot_every=1, on_snapshot=crash_at(4))
    os.truncate(ckpt / checkpoints.LATEST, 100)
    with caplog.at_level(logging.WARNING, logger="diffprune.checkpoints"):
        summary = run(tmp_path, "x")
    assert summary["resumed_from_step"] == 0 and summary["final_loss"] == clean["final_loss"]
    assert "is unreadable" in caplog.text and "moved it to latest.pt.corrupt-" in caplog.text
    assert same_weights(tmp_path / "clean" / "model", tmp_path / "x" / "model")
    assert [p.name.split("-")[0] for p in ckpt.glob("*.corrupt-*")] == ["latest.pt.corrupt"]


def test_truncated_model_and_store_are_refused_with_the_file_named(tmp_path):
    run(tmp_path, "m")
    weights = tmp_path / "m" / "model" / WEIGHTS
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(Exception) as err:  # the loader's own error, checked below
        load_model(tmp_path / "m" / "model")
    assert "safetensors" in f"{type(err.value).__module__} {err.value}".lower()

    store = tmp_path / "store"
    write_store(store, np.arange(4), seed=0)
    os.truncate(store / "images.npy", (store / "images.npy").stat().st_size - 64)
    with pytest.raises(Exception, match=r"images\.npy|larger|size|shape"):
        np.asarray(load_store(store).images)


# --------------------------------------------------------------------------- corrupt checkpoints
@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
        pytest.param(lambda p: p.write_bytes(b"neither a zip nor a pickle"), id="garbage"),
        pytest.param(lambda p: torch.save({"weights": torch.zeros(2)}, p), id="not-a-checkpoint"),
    ],
)
def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(tmp_path, caplog, damage):
    clean = run(tmp_path, "clean")
    with pytest.raises(Crash):
        run(tmp_path, "x", snapshot_every=1, on_snapshot=crash_at(7))
    ckpt = tmp_path / "x" / "ckpt"
    assert torch.load(ckpt / checkpoints.PREVIOUS, weights_only=True)["step"] == 3
    damage(ckpt / checkpoints.LATEST)
    with caplog.at_level(logging.WARNING, logger="diffprune.checkpoints"):
        summary = run(tmp_path, "x")
    assert summary["resumed_from_step"] == 3  # previous.pt, not latest.pt (step 6)
    assert "moved it to latest.pt.corrupt-" in caplog.text
    assert summary["final_loss"] == clean["final_loss"]
    assert same_weights(tmp_path / "clean" / "model", tmp_path / "x" / "model")
    assert not (ckpt / checkpoints.LATEST).exists() and not (ckpt / checkpoints.PREVIOUS).exists()


def test_latest_checkpoint_exists_at_every_moment_of_a_save(tmp_path, monkeypatch):
    """Rotation never leaves the folder without latest.pt: a reader (or a crash) at any moment
    finds the newest complete checkpoint there, and previous.pt is the one before it."""
    seen = []
    real_save = torch.save

    def watching_save(obj, f, *args, **kwargs):
        latest = tmp_path / checkpoints.LATEST
        if latest.exists():
            seen.append(torch.load(latest, weights_only=True)["step"])
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", watching_save)
    for step in (1, 2, 3):
        checkpoints.save(tmp_path, {"key": {}, "step": step})
    assert seen == [1, 2]  # during the saves of steps 2 and 3, the former latest.pt was there
    assert torch.load(tmp_path / checkpoints.LATEST, weights_only=True)["step"] == 3
    assert torch.load(tmp_path / checkpoints.PREVIOUS, weights_only=True)["step"] == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_second_training_of_the_same_run_is_refused_while_one_runs(tmp_path):
    with (
        locked_elsewhere(tmp_path / "x" / "ckpt") as holder,
        pytest.raises(checkpoints.RunLocked, match=f"pid {holder}.*is training"),
    ):
        run(tmp_path, "x")
    assert not (tmp_path / "x" / "model").exists()
    run(tmp_path, "x")  # the lock went with its holder
    assert (tmp_path / "x" / "model" / WEIGHTS).is_file()


# --------------------------------------------------------------------------- bad params
def test_bad_params_cases_are_at_least_40():
    assert len(CASES) >= 40


PARSE = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

results = {}
for case in sorted(Path(sys.argv[1]).iterdir()):
    (case / "Snakefile").write_text(Path(sys.argv[2]).read_text())
    try:
        with SnakemakeApi(OutputSettings()) as api:
            workflow = api.workflow(
                resource_settings=ResourceSettings(cores=1),
                config_settings=ConfigSettings(),
                snakefile=case / "Snakefile",
                workdir=case,
            )
            workflow.dag()
        results[case.name] = None
    except Exception as err:
        results[case.name] = f"{type(err).__name__}: {err}"
print(json.dumps(results))
"""


def test_bad_params_fail_snakemakes_parse_with_one_line_before_any_job(tmp_path):
    """Every case of tests/test_bad_params.py, written as params.yaml of a copy of the workflow
    and parsed by Snakemake itself (its API, one process for all cases)."""
    snakefile = tmp_path / "Snakefile"
    text = (REPO / "Snakefile").read_text()
    snakefile.write_text(text.replace('include: "workflow/', f'include: "{REPO}/workflow/'))
    cases = tmp_path / "cases"
    expected, expected_changes = {}, {}
    for number, param in enumerate(CASES):
        changes, key, value, message, shown = param.values
        folder = cases / f"{number:03d}"
        folder.mkdir(parents=True)
        (folder / "params.yaml").write_text(yaml.safe_dump(with_changes(changes)))
        expected[folder.name] = (key, value, message, shown)
        expected_changes[folder.name] = changes
    result = subprocess.run(
        [sys.executable, "-c", PARSE, str(cases), str(snakefile)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = yaml.safe_load(result.stdout.splitlines()[-1])
    assert errors.keys() == expected.keys()
    parsed = 0
    for name, (key, value, message, shown) in expected.items():
        error = errors[name]
        if checked_only_where_cuda_is_probed(expected_changes[name]):
            assert error is None, error  # the parse also serves dry runs on machines without GPUs
            continue
        parsed += 1
        assert error is not None, f"case {name} ({key} = {value!r}) was accepted"
        assert error.startswith(f"{ConfigError.__name__}: params.yaml"), error
        assert len(error.splitlines()) == 1 and message in error, error
        if shown is not None:
            assert shown in error, error
        else:
            assert key in error, error
            assert any(f" = {text}" in error for text in shown_value(value)), error
        assert not (cases / name / "data").exists() and not (cases / name / "results").exists()
    assert parsed >= 40


def checked_only_where_cuda_is_probed(changes: dict) -> bool:
    """Whether a CUDA device is visible is checked by load_params (in the job), not by the parse
    (which validates with check_cuda=False): such a case passes that validation."""
    try:
        validate_params(with_changes(changes))
    except ConfigError:
        return False
    return True


def test_bad_param_on_snakemakes_command_line_stops_before_any_job(tmp_path):
    snakefile = tmp_path / "Snakefile"
    text = (REPO / "Snakefile").read_text()
    snakefile.write_text(text.replace('include: "workflow/', f'include: "{REPO}/workflow/'))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "--cores", "1", "--config", "dummy=1"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "unknown key(s) dummy" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    assert not (tmp_path / "data").exists() and "Execute" not in result.stderr


# --------------------------------------------------------------------------- kill -9 and orphans
SNAKEFILE = """
configfile: "config.yaml"

rule train:
    input:
        store=["store/train/images.npy", "store/train/index.parquet", "store/train/store.json"],
        manifest="manifest.parquet",
    output:
        model=directory("runs/{{run}}/s{{seed}}/model"),
        log_dir=directory("runs/{{run}}/s{{seed}}/live"),
    params:
        train=config["train"],
        checkpoints=lambda wildcards: f"checkpoints/{{wildcards.run}}/s{{wildcards.seed}}",
    log:
        "logs/{{run}}_s{{seed}}.log",
    threads: 1
    script:
        "{script}"
"""


@pytest.fixture
def project(tmp_path) -> Path:
    """A one-rule Snakemake project whose rule is the real train rule's script."""
    write_store(tmp_path / "store" / "train", np.repeat(np.arange(4), 3), seed=1)
    manifest = pd.DataFrame({"sample_id": np.arange(12), "keep": True})
    io.save_parquet(tmp_path / "manifest.parquet", manifest)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": TINY}))
    script = REPO / "workflow" / "scripts" / "train.py"
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(script=script))
    return tmp_path


def snakemake(project: Path, target: str, *args: str) -> subprocess.Popen:
    """Snakemake in the background, its output in snakemake.out (a pipe nobody reads would block
    the job once it fills)."""
    with open(project / "snakemake.out", "a") as out:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "snakemake"), "--cores", "1", *args, target],
            cwd=project,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def training_pid(project: Path, run: str) -> int:
    """The training job's pid, from its checkpoint folder's lock, once its first checkpoint is
    written."""
    ckpt = project / "checkpoints" / run / f"s{SEED}"
    wait_for(lambda: (ckpt / checkpoints.LATEST).exists(), timeout=120, what="the first checkpoint")
    return int((ckpt / checkpoints.LOCK).read_text())


def finish(process: subprocess.Popen, project: Path) -> None:
    output = project / "snakemake.out"
    assert process.wait(timeout=300) == 0, output.read_text()[-3000:]


@pytest.mark.slow  # Snakemake and the train script start (torch, diffusers)
def test_kill_9_mid_training_resumes_to_the_same_bytes(project):
    engine = snakemake(project, f"runs/killed/s{SEED}/model")
    job = training_pid(project, "killed")
    os.kill(job, signal.SIGKILL)
    assert engine.wait(timeout=60) != 0  # Snakemake saw its job die
    assert not (project / "runs" / "killed" / f"s{SEED}" / "model").exists()

    finish(snakemake(project, f"runs/killed/s{SEED}/model", "--rerun-incomplete"), project)
    killed, clean = project / "runs" / "killed" / f"s{SEED}" / "model", project / "clean"
    resumed = io.load_json(killed / "train.json")
    assert 0 < resumed["resumed_from_step"] < TINY["steps"]
    # the uninterrupted run: the same images (all rows kept), params and seed, in this process
    uninterrupted = train(
        images=np.asarray(load_store(project / "store" / "train").images),
        cfg=TINY,
        seed=SEED,
        out_dir=clean,
        checkpoint_dir=project / "clean-checkpoints",
        progress=False,
    )
    assert same_weights(killed, clean)
    assert resumed["final_loss"] == uninterrupted["final_loss"]


@pytest.mark.slow  # Snakemake and the train script start (torch, diffusers)
def test_orphaned_training_stops_when_snakemake_is_killed(project):
    """Snakemake -> train script; kill -9 Snakemake: the job stops itself within seconds (the
    run has 100,000 steps), leaves its run unlocked and a checkpoint to resume from."""
    (project / "config.yaml").write_text(yaml.safe_dump({"train": {**TINY, "steps": 100_000}}))
    engine = snakemake(project, f"runs/orphan/s{SEED}/model")
    job = training_pid(project, "orphan")
    engine.send_signal(signal.SIGKILL)
    engine.wait()
    wait_for(lambda: not alive(job), timeout=15, what=f"the orphaned job {job} to stop")
    log = (project / "logs" / "orphan_s0.log").read_text()
    assert f"stopping: process {engine.pid}, which started this job" in log
    ckpt = project / "checkpoints" / "orphan" / f"s{SEED}"
    with checkpoints.run_lock(ckpt):  # free: a rerun may train the run now
        assert torch.load(ckpt / checkpoints.LATEST, weights_only=True)["step"] >= 10
    assert not (project / "runs" / "orphan" / f"s{SEED}" / "model").exists()


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from diffprune.logs import stop_when_orphaned
    watched = stop_when_orphaned(interval=0.1, grace=5)
    Path(sys.argv[1]).write_text(" ".join(map(str, watched)))
    try:
        time.sleep(60)
    except SystemExit:
        Path(sys.argv[1]).with_suffix(".stopped").write_text("stopped")
        raise
    """
)


def test_orphan_watchdog_watches_its_parent_outside_snakemake(tmp_path):
    """Parent (no Snakemake above it) -> child; kill -9 the parent: the child stops itself."""
    parent, watched = orphan_stops(CHILD, tmp_path / "child.pids")
    assert watched == str(parent)


def orphan_stops(child: str, marker: Path) -> tuple[int, str]:
    """Run the code `child` (argv[1]: `marker`) under a parent process, wait for the child to
    write `marker`, kill -9 the parent and wait for the child to write `marker`.stopped;
    returns the parent's pid and what the child wrote."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1], "
            "sys.argv[2]]); import time; time.sleep(60)",
            child,
            str(marker),
        ],
        env=ENV,
    )
    # content, not existence: write_text creates the file empty before it writes
    wait_for(lambda: marker.exists() and marker.read_text(), timeout=60, what="the child to start")
    written = marker.read_text()
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    wait_for(lambda: marker.with_suffix(".stopped").exists(), timeout=10, what="the child to stop")
    return parent.pid, written


@pytest.mark.parametrize(
    ("argv", "engine"),
    [
        (["/venv/bin/python", "/venv/bin/snakemake", "--cores", "all"], True),
        (["snakemake", "-n"], True),
        (["python3", "-m", "snakemake", "--cores", "1"], True),
        (["/venv/bin/python", "/work/.snakemake/scripts/tmpab12.train.py"], False),
        (["python", "-m", "pytest", "tests/test_snakemake_like.py"], False),
    ],
)
def test_the_engine_is_snakemake_itself_not_a_job_script(argv, engine):
    assert logs._is_snakemake(argv) is engine


@pytest.mark.slow  # a tiny study's upstream jobs, then Snakemake and DVC at once
def test_dvc_repro_during_a_snakemake_run_refuses_and_destroys_nothing(tmp_path):
    """Concurrent engines: while Snakemake trains a run, `dvc repro` of that run's stage refuses
    (its Snakemake call cannot take the lock) and leaves the running job's files alone (outputs
    are `persist`, so DVC deletes nothing before its command); the training then completes."""
    from tests import workflow_helpers as wf

    params = wf.tiny_params(
        study={**wf.TINY["study"], "methods": ["random"], "seeds": [0], "extra_runs": []},
        train={**wf.TINY["train"], "steps": 3000, "checkpoint_every": 10, "log_every": 10},
    )
    root = wf.make_project(tmp_path / "study", params)
    model = f"data/runs/random_r0.5/s{SEED}/model"
    # every seed's manifest: the stage of random_r0.5's trainings reads them all
    wf.snakemake(
        root, *(f"data/runs/random_r0.5/s{s}/manifest.parquet" for s in wf.TINY["study"]["seeds"])
    )
    with open(root / "snakemake.out", "w") as out:
        engine = subprocess.Popen(
            [str(wf.BIN / "snakemake"), "--cores", "1", model],
            cwd=root,
            env=wf.ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        live = root / f"data/runs/random_r0.5/s{SEED}/dvclive"
        ckpt = root / f"data/checkpoints/random_r0.5/s{SEED}" / checkpoints.LATEST
        wait_for(ckpt.exists, timeout=180, what="the first checkpoint")
        refused = wf.dvc(root, "repro", "--single-item", "train_random_r0p5", check=False)
        assert refused.returncode != 0
        assert "cannot be locked" in refused.stdout + refused.stderr
        assert engine.poll() is None and live.is_dir() and ckpt.exists()  # nothing deleted
    finally:
        # SIGTERM would make Snakemake wait for the training to finish; killed, its job's
        # watchdog (diffprune.logs.stop_when_orphaned, tested above) stops the training
        engine.kill()
        engine.wait(timeout=60)


def test_a_finished_run_leaves_no_lock_file_or_checkpoint_folder(tmp_path):
    """The run lock guards checkpoints; once the model is written there is nothing to guard."""
    ckpt = tmp_path / "ckpt"
    with checkpoints.run_lock(ckpt):
        assert (ckpt / checkpoints.LOCK).exists()
    assert not ckpt.exists()
    ckpt.mkdir()
    (ckpt / checkpoints.LATEST).write_bytes(b"x")  # an interrupted run keeps its lock file
    with checkpoints.run_lock(ckpt):
        pass
    assert (ckpt / checkpoints.LOCK).exists()


# --- params safety (issue 16) ---
MARKER = "ran.txt"
STORE = "data/store/train/images.npy"
TEMPLATED = f'__use_yte__: true\nreport:\n  dir: ?open("{MARKER}", "w").write("x") and "results"\n'
# nine aliases per level, six levels: 531,441 items from a few hundred bytes (the bomb of the
# issue had more levels, and ran 75 s to 3.1 GB)
BOMB = "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9) if i else ', '.join(['1'] * 9)}]\n"
    for i in range(6)
)
DUPLICATE = "train:\n  lr: 0.002\n  lr: 0.0005\n"
UNSAFE = {
    "templated": (TEMPLATED, "line 1: key '__use_yte__' is templating"),
    "duplicate": (DUPLICATE, "line 3: key 'lr' is written twice (first at line 2)"),
    "aliases": (BOMB, "line 2: alias *a0: YAML aliases are refused"),
    "conditional": ("train:\n  ?if True:\n    lr: 1\n", "line 2: key '?if True' is templating"),
}


def workflow_copy(root: Path) -> Path:
    """The Snakefile (its includes pointing at this checkout), its workflow profile and the
    default params.yaml: what Snakemake's command line and the dvc.yaml generator read."""
    root.mkdir(parents=True, exist_ok=True)
    text = (REPO / "Snakefile").read_text()
    text = text.replace('include: "workflow/', f'include: "{REPO}/workflow/')
    (root / "Snakefile").write_text(text)
    (root / "profiles").symlink_to(REPO / "workflow" / "profiles")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return root


@pytest.mark.parametrize("name", UNSAFE)
def test_unsafe_params_yaml_is_refused_with_its_line_before_anything_expands(tmp_path, name):
    from diffprune.config import load_params

    text, message = UNSAFE[name]
    path = tmp_path / "params.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        load_params(path, check_cuda=False)
    assert time.perf_counter() - start < 1.0
    assert len(str(error.value).splitlines()) == 1 and f"{path} {message}" in str(error.value)
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("name", ["templated", "duplicate", "aliases"])
def test_an_unsafe_overlay_is_refused_before_snakemake_reads_it(tmp_path, name):
    """Snakemake reads --configfile overlays (rendering YTE, running its code) while parsing its
    command line, before the Snakefile; the workflow profile refuses them first."""
    root = workflow_copy(tmp_path)
    (root / "o.yaml").write_text(UNSAFE[name][0])
    result = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-n", "--configfile", "o.yaml"],
        cwd=root, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and not (root / MARKER).exists()
    assert result.stderr.splitlines()[-1].startswith(f"diffprune: o.yaml {UNSAFE[name][1]}")
    assert "Traceback" not in result.stderr and not (root / ".snakemake").exists()


def test_unsafe_params_yaml_stops_snakemakes_parse_and_the_dvc_yaml_generator(tmp_path):
    """params.yaml read by the Snakefile's `configfile:` (through Snakemake's API, as the
    dvc.yaml generator does), and by `python -m diffprune dvc-yaml --check` itself."""
    cases = tmp_path / "cases"
    for name in ("templated", "duplicate", "aliases"):
        (cases / name).mkdir(parents=True)
        (cases / name / "params.yaml").write_text(UNSAFE[name][0])
    images = cases / "self_including"
    images.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= {"source": "imagefolder", "path": "results"}
    (images / "params.yaml").write_text(yaml.safe_dump(params))
    snakefile = workflow_copy(tmp_path / "project") / "Snakefile"
    result = subprocess.run(
        [sys.executable, "-c", PARSE, str(cases), str(snakefile)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = yaml.safe_load(result.stdout.splitlines()[-1])
    for name in ("templated", "duplicate", "aliases"):
        assert errors[name].startswith("ConfigError: params.yaml line"), errors[name]
        assert UNSAFE[name][1] in errors[name] and len(errors[name].splitlines()) == 1
    assert "data.path = 'results': overlaps results/" in errors["self_including"]
    assert not list(cases.glob(f"*/{MARKER}")) and not list(cases.glob("*/data"))

    (tmp_path / "project" / "params.yaml").write_text(TEMPLATED)
    generator = subprocess.run(
        [sys.executable, "-m", "diffprune", "dvc-yaml", "--check"],
        cwd=tmp_path / "project", env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert generator.returncode != 0 and not (tmp_path / "project" / MARKER).exists()
    assert generator.stderr.splitlines()[-1].startswith(
        "diffprune: error: params.yaml line 1: key '__use_yte__' is templating"
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"data.path": "results"},
        {"data.path": "."},
        {"data.path": "results/plots"},
        {"data.test_path": "data/store/extra", "data.path": "/images"},
    ],
)
def test_an_image_folder_that_holds_or_is_in_the_workflows_outputs_is_refused(changes):
    key = next(k for k in ("data.test_path", "data.path") if k in changes)
    with pytest.raises(ConfigError) as error:
        validate_params(with_changes({"data.source": "imagefolder", **changes}))
    message = str(error.value)
    assert len(message.splitlines()) == 1 and f"{key} = {changes[key]!r}: overlaps" in message
    assert "never settle; allowed: a folder neither inside nor holding" in message


def test_an_image_folder_beside_the_outputs_is_allowed_and_every_output_is_in_a_written_folder():
    from diffprune import paths

    beside = {"data.source": "imagefolder", "data.path": "data/imagenet/train"}
    validate_params(with_changes(beside))
    written = paths.written_folders()
    for name in dir(paths):
        function = getattr(paths, name)
        if not callable(function) or name in ("Path", "written_folders") or name.startswith("_"):
            continue
        arity = function.__code__.co_argcount - len(function.__defaults__ or ())
        path = Path(function(*["x", "0", "y"][:arity]))
        assert any(path.is_relative_to(folder) for folder in written), (name, path)


@pytest.mark.slow  # Snakemake's command line up to its first job
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_naming_the_key_before_any_job(tmp_path):
    from diffprune.device import resolve_device

    root = workflow_copy(tmp_path)
    (root / "cuda.yaml").write_text("evaluate:\n  device: cuda\n")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), STORE, "--configfile", "cuda.yaml"],
        cwd=root, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if "evaluate.device = 'cuda'" in line]
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-3000:]
    assert "no CUDA device is visible; use auto or cpu" in lines[0]
    assert not (root / "data").exists() and not (root / "logs").exists()
    with pytest.raises(ConfigError, match=r"^train.device = 'cuda': no CUDA device is visible"):
        resolve_device("cuda", key="train.device")  # the in-job check, where a cluster runs it


class FakeJob:
    """What changed_params reads of a Snakemake job."""

    def __init__(self, rule: str, **params) -> None:
        self.rule, self.output, self.params = type("Rule", (), {"name": rule}), ["out"], params


def test_changed_params_are_those_the_job_read_and_only_they(tmp_path):
    from diffprune.dvc_yaml import changed_params, check_params_unchanged

    config = yaml.safe_load((REPO / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    edited = yaml.safe_load((REPO / "params.yaml").read_text())
    edited["train"]["lr"] /= 4
    edited["report"]["metric"] = "kid_classifier"
    path.write_text(yaml.safe_dump(edited))
    sample = FakeJob("sample", sample=config["sample"], device=config["train"]["device"])
    assert changed_params([sample], config, path) == []
    train = FakeJob("train", train=config["train"], checkpoints="ckpt")
    with pytest.raises(ConfigError, match=r"params.yaml changed while this stage ran: train;"):
        check_params_unchanged([sample, train], config, path)


@pytest.mark.slow  # one stage's command as DVC runs it (Snakemake, the store job)
def test_params_edited_while_a_dvc_stage_runs_fail_the_stage_so_no_lock_records_them(tmp_path):
    """DVC writes dvc.lock from params.yaml after a command exits 0: the stage must fail."""
    from diffprune.dvc_yaml import SHAPE_LINE, Job, command, shape_digest
    from tests import workflow_helpers as wf

    root = workflow_copy(tmp_path)
    params = wf.tiny_params()
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(f"{SHAPE_LINE}{shape_digest(params)}\n")
    job = Job("download", (), "", (), (), ("data/store/train/images.npy",), ("data",))
    stage = subprocess.Popen(
        command((job,)), shell=True, cwd=root, env=ENV, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: any((root / ".snakemake" / "incomplete").glob("*")), timeout=120,
             what="the job's start")  # fmt: skip
    params["data"]["test_fraction"] = 0.2  # while the job runs
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _, stderr = stage.communicate(timeout=300)
    assert stage.returncode != 0 and (root / "data/store/train/images.npy").exists()
    assert "params.yaml changed while this stage ran: data; " in stderr, stderr[-3000:]


# --- jobs, locks and disk (issue 16) ---
def _train_autoencoder(out: Path, ckpt: Path) -> None:
    from tests.test_autoencoder import TINY as TINY_AE

    train_autoencoder(images(8, 0), cfg=TINY_AE, resolution=8, seed=0, out_dir=out,
                      checkpoint_dir=ckpt, progress=False)  # fmt: skip


def _train_surrogate(out: Path, ckpt: Path) -> None:
    train_surrogate(images(), cfg=TINY, seed=0, out_dir=out, checkpoint_dir=ckpt, progress=False)


def _train_moso(out: Path, ckpt: Path) -> None:
    train_moso_surrogates(images(), num_subsets=2, cfg=TINY, seed=0, out_dir=out,
                          checkpoint_dir=ckpt, progress=False)  # fmt: skip


@pytest.mark.parametrize("training", [_train_autoencoder, _train_surrogate, _train_moso])
def test_every_training_refuses_while_another_process_trains_its_run(tmp_path, training):
    """A rerun after `--unlock` beside an orphaned job: the second training of one checkpoint
    folder refuses at once with one line naming the holder, and writes nothing."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    with locked_elsewhere(ckpt) as holder:
        with pytest.raises(checkpoints.RunLocked) as refused:
            training(out, ckpt)
        assert f"another process (pid {holder}) is training this run ({ckpt / 'lock'}" in str(
            refused.value
        )
        assert "\n" not in str(refused.value)
    assert not out.exists() and sorted(p.name for p in ckpt.iterdir()) == [checkpoints.LOCK]


def test_a_process_enters_a_run_lock_it_holds_and_releases_it_once(tmp_path):
    """A surrogate holds its run's lock around train(), which takes the same lock."""
    ckpt = tmp_path / "ckpt"
    with checkpoints.run_lock(ckpt), checkpoints.run_lock(ckpt):
        (ckpt / checkpoints.LATEST).write_bytes(b"x")
    with (
        locked_elsewhere(ckpt) as holder,  # released: another process takes it
        pytest.raises(checkpoints.RunLocked, match=f"pid {holder}"),
        checkpoints.run_lock(ckpt),
    ):
        pass


def test_every_workflow_script_calls_setup_first():
    """logs.setup starts the orphan watchdog, so every job (embed, autoencoder, score, ...) stops
    itself when Snakemake is killed: each script calls it before any work."""
    scripts = sorted((REPO / "workflow" / "scripts").glob("*.py"))
    assert len(scripts) >= 16
    for script in scripts:
        body = [
            node
            for node in ast.parse(script.read_text()).body
            if not isinstance(node, ast.Import | ast.ImportFrom)
            and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
        ]
        first = body[0]
        assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Call), script.name
        assert ast.unparse(first.value.func) == "setup", f"{script.name}: {ast.unparse(first)}"


SETUP_CHILD = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    from diffprune import logs
    def watchdogs():
        return sum(t.name == "stop-when-orphaned" for t in threading.enumerate())
    logs.setup(sys.argv[1] + ".log")
    after_setup = watchdogs()
    watched = logs.stop_when_orphaned()  # a second call: the watchdog setup started
    Path(sys.argv[1]).write_text(f"{watched} {after_setup} {watchdogs()}")
    try:
        time.sleep(60)
    except SystemExit:
        Path(sys.argv[1]).with_suffix(".stopped").write_text("stopped")
        raise
    """
)


def test_a_job_set_up_by_logs_setup_stops_when_its_parent_dies(tmp_path):
    """What every workflow script does first (logs.setup) starts one watchdog: kill -9 the job's
    parent and the job stops itself, saying why in its log."""
    parent, written = orphan_stops(SETUP_CHILD, tmp_path / "job")
    assert written == f"[{parent}] 1 1"  # one watchdog, started by setup
    log = (tmp_path / "job.log").read_text()
    assert f"stopping: process {parent}, which started this job" in log


@pytest.fixture
def tiny_disk(tmp_path) -> Iterator[Path]:
    """A 2 MiB file system (tmpfs), to fill for real; skipped where mounting is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        # lazy: a caught exception's frames may still hold a file open there
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def disk_full_line(text: str, path: Path, needed: int | None = None) -> str:
    """The DiskFull line of `text`, checked to name `path` and the bytes needed and available."""
    lines = [line for line in text.splitlines() if "DiskFull: " in line]
    assert lines, text[-2000:]
    bytes_needed = str(needed) if needed else r"\d+"
    expected = rf"{re.escape(str(path))}: {bytes_needed} bytes needed, \d+ available; "
    assert re.search(expected, lines[-1]), lines[-1]
    return lines[-1]


STORE_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np, pandas as pd
    from diffprune.data.store import write_store
    n = 2000  # 8 MB of 64 x 64 gray images on a 2 MiB disk
    batches = (np.full((100, 64, 64, 1), 7, np.uint8) for _ in range(n // 100))
    write_store(sys.argv[1], batches, (n, 64, 64, 1), pd.DataFrame({"sample_id": range(n)}), {})
    """
)


def test_a_full_disk_stops_a_memory_mapped_write_with_one_line_not_sigbus(tiny_disk):
    """The store written through a memory map onto a full disk: before, SIGBUS (exit 135) and an
    8 MB hidden temporary; now one line naming images.npy and the bytes, and nothing left."""
    store = tiny_disk / "store"
    done = subprocess.run(
        [sys.executable, "-c", STORE_WRITER, str(store)], capture_output=True, text=True, env=ENV
    )
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    disk_full_line(done.stderr, store / "images.npy", 2000 * 64 * 64 + 128)
    assert list(store.iterdir()) == []


def test_a_memory_map_that_cannot_be_allocated_is_disk_full_and_removed(tiny_disk, monkeypatch):
    """Past the free-space check (another writer took the space meanwhile), the allocation
    itself fails as one DiskFull line, before any page is written through the map."""
    monkeypatch.setattr(io, "check_space", lambda path, nbytes: None)
    out = tiny_disk / "embeddings.npy"
    with pytest.raises(DiskFull) as full:
        embed_to_file(images(), SimpleNamespace(dim=1_000_000), out, progress=False)
    disk_full_line(f"DiskFull: {full.value}", out, 12 * 1_000_000 * 4 + 128)
    assert list(tiny_disk.iterdir()) == []


def test_a_checkpoint_on_a_full_disk_is_one_line_and_keeps_latest(tiny_disk, monkeypatch):
    """Before: `RuntimeError: [enforce fail at inline_container.cc:672]`. Now: one line naming
    latest.pt and the bytes, checked before writing; and if the disk fills while torch.save
    writes, the same line. latest.pt and previous.pt stay as they were, no temporary is left."""
    checkpoints.save(tiny_disk, {"key": {}, "step": 1, "w": torch.zeros(10_000)})
    checkpoints.save(tiny_disk, {"key": {}, "step": 2, "w": torch.ones(10_000)})
    big = {"key": {}, "step": 3, "w": torch.zeros(1_000_000)}
    with pytest.raises(DiskFull) as full:
        checkpoints.save(tiny_disk, big)
    disk_full_line(f"DiskFull: {full.value}", tiny_disk / checkpoints.LATEST)
    monkeypatch.setattr(io, "check_space", lambda path, nbytes: None)
    with pytest.raises(DiskFull) as full:  # the disk fills inside torch.save
        checkpoints.save(tiny_disk, big)
    disk_full_line(f"DiskFull: {full.value}", tiny_disk / checkpoints.LATEST)
    assert "no space left on device" in str(full.value)
    assert torch.load(tiny_disk / checkpoints.LATEST, weights_only=True)["step"] == 2
    assert torch.load(tiny_disk / checkpoints.PREVIOUS, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tiny_disk.iterdir()) == [checkpoints.LATEST, checkpoints.PREVIOUS]


def _write_store(out: Path) -> None:
    index = pd.DataFrame({"sample_id": np.arange(12)})
    write_image_store(out.parent, iter([images()]), (12, 8, 8, 1), index, {})


def _write_embeddings(out: Path) -> None:
    embed_to_file(images(), SimpleNamespace(dim=64), out, progress=False)


def _write_checkpoint(out: Path) -> None:
    checkpoints.save(out.parent, {"key": {}, "step": 1, "w": torch.zeros(64)})


def _write_npy(out: Path) -> None:
    io.save_npy(out, np.zeros(100))


@pytest.mark.parametrize(
    ("writer", "name", "needed"),
    [
        (_write_store, "images.npy", 12 * 8 * 8 + 128),
        (_write_embeddings, "embeddings.npy", 12 * 64 * 4 + 128),
        (_write_checkpoint, checkpoints.LATEST, 64 * 4 + 1024 + (64 << 10)),
        (_write_npy, "scores.npy", 800),
    ],
)
def test_a_large_write_checks_the_free_space_first(tmp_path, monkeypatch, writer, name, needed):
    """Every large write (memory-mapped .npy outputs, checkpoints, arrays) checks the free space
    of its folder first: one line naming the output and the bytes needed and available, and
    neither the output nor a temporary is written."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=needed - 1))
    out = tmp_path / "out" / name
    with pytest.raises(DiskFull) as full:
        writer(out)
    line = disk_full_line(f"DiskFull: {full.value}", out, needed)
    assert line.endswith(f"{needed - 1} available; free space there, then rerun")
    assert list(out.parent.iterdir()) == []


WRITER = textwrap.dedent(
    """
    import sys, time
    from diffprune import io
    with io.atomic_path(sys.argv[1]) as tmp:
        tmp.write_bytes(bytes(10_000_000))
        print("writing", flush=True)
        time.sleep(60)
    """
)


def test_temporaries_of_a_killed_writer_are_removed_when_the_output_is_written_again(tmp_path):
    """A killed embed left a 10 MB `.embeddings.npy.*.tmp` after a successful rerun. Now the
    rerun's write of the output removes the temporaries of dead processes (and of older
    versions, without a pid) and keeps those of a live writer and of other outputs."""
    out = tmp_path / "embeddings.npy"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()
    writer.wait()
    (killed,) = tmp_path.glob(f".embeddings.npy.{writer.pid}.*.tmp")
    assert killed.stat().st_size == 10_000_000
    older = tmp_path / ".embeddings.npy.ab1_cd2e.tmp"
    older_dir = tmp_path / f".embeddings.npy.{writer.pid}.xyz.tmp"
    live = tmp_path / f".embeddings.npy.{os.getpid()}.abc.tmp"
    other = tmp_path / f".embeddings.npy.bak.{writer.pid}.abc.tmp"
    for path in (older, live, other):
        path.write_bytes(b"x")
    older_dir.mkdir()
    io.save_npy(out, np.zeros(3))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["embeddings.npy", live.name, other.name])


# --- data correctness (issue 16) ---


def _mode_images(folder: Path) -> dict[str, int | None]:
    """One 4x4 image per PIL mode, and the 8-bit gray each must give (None: refused)."""
    folder.mkdir()
    flat = np.full((4, 4), 0.9, np.float32)
    cases = {
        "float01.tif": (Image.fromarray(flat), 230),  # 0.9 * 255 = 229.5 -> 230 (round half even)
        "float255.tif": (Image.fromarray(flat * 255), None),  # floats outside [0, 1]
        "floatnan.tif": (Image.fromarray(np.full((4, 4), np.nan, np.float32)), None),
        "int32.tif": (Image.fromarray(np.full((4, 4), 230, np.int32)), None),
        "u16.tif": (Image.fromarray(np.full((4, 4), 0x8080, np.uint16)), 128),
        "u16.png": (Image.fromarray(np.full((4, 4), 0xE6E6, np.uint16)), 230),
        "u16b.tif": (Image.fromarray(np.full((4, 4), 0x8080, ">u2")), 128),  # mode I;16B
        "bilevel.png": (Image.new("1", (4, 4), 1), 255),
        "palette.png": (Image.new("P", (4, 4), 0), 0),
        "la.png": (Image.new("LA", (4, 4), (200, 10)), 200),
        "rgba.png": (Image.new("RGBA", (4, 4), (200, 200, 200, 10)), 200),
        "cmyk.tif": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), 255),
        "ycbcr.tif": (Image.new("YCbCr", (4, 4), (200, 128, 128)), 200),
    }
    for name, (image, _) in cases.items():
        image.save(folder / name)
    return {name: gray for name, (_, gray) in cases.items()}


def test_every_pil_mode_is_scaled_to_8_bits_or_refused_and_listed(tmp_path):
    """A float32 TIFF of 0.9 used to be stored as 0 and an int32 TIFF of 230 as 1, unlisted."""
    expected = _mode_images(tmp_path / "modes")
    (tmp_path / "held").mkdir()  # held-out images of their own: no holdout takes from "modes"
    meta = build.build_store(
        tmp_path / "store", source="imagefolder", split="train", path=tmp_path / "modes",
        test_path=tmp_path / "held", image_size=4, channels=1, progress=False,
    )  # fmt: skip
    store = load_store(tmp_path / "store")
    pixels = store.images[..., 0].reshape(len(store), -1)
    got = dict(zip(store.index["source"], pixels, strict=True))
    refused = {b["path"]: b["reason"] for b in meta["bad_images"]}
    for name, gray in expected.items():
        if gray is None:
            assert name not in got and name in refused, name
        else:  # each image is one flat colour, so any resampling keeps it (within rounding)
            assert name not in refused and np.abs(got[name].astype(int) - gray).max() <= 1, name
    assert "32-bit integer" in refused["int32.tif"] and "[0, 1]" in refused["float255.tif"]
    assert "NaN" in refused["floatnan.tif"]


def test_a_flat_heldout_folder_beside_class_folders_is_refused_at_plan_time(tmp_path):
    """It used to give test labels -1 and a classifier test_accuracy of 0.0, with no warning."""
    for sub in ("train/cats", "train/dogs", "test"):
        (tmp_path / sub).mkdir(parents=True)
    for i in range(4):
        for sub in ("train/cats", "train/dogs", "test"):
            Image.new("L", (4, 4), 60 * i).save(tmp_path / sub / f"{i}.png")
    data = {"source": "imagefolder", "path": str(tmp_path), "test_path": None}
    allowed = r"not in class folders .* allowed: the held-out images in folders named after"
    with pytest.raises(ConfigError, match=allowed):  # what the Snakefile computes at every plan
        source_fingerprint(data, "test")
    with pytest.raises(ConfigError, match=allowed):
        build.build_store(
            tmp_path / "store", source="imagefolder", split="test", path=tmp_path, progress=False
        )
    assert source_fingerprint(data, "train")["holdout"] is False  # the train split is fine
    model = train_classifier(
        np.zeros((4, 4, 4, 1), np.uint8), np.array([0, 1, 0, 1]), num_classes=2,
        resolution=4, epochs=1, batch_size=4, lr=1e-3, seed=0,
    )  # fmt: skip
    with pytest.raises(DataError, match="have no label"):  # and any other way to unknown labels
        classifier_accuracy(model, np.zeros((2, 4, 4, 1), np.uint8), np.array([-1, 0]))


def _truncated_manifest(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    io.save_parquet(path, full_manifest(40))
    path.write_bytes(path.read_bytes()[:-30])  # cut short: the Parquet footer is gone


def test_a_truncated_manifest_is_moved_aside_while_planning_and_rebuilt_by_select(tmp_path):
    """It used to end training in an Arrow traceback after Snakemake had deleted the model, and
    every rerun did the same (the damaged file stayed newer than the model)."""
    from tests import workflow_helpers as wf

    root = wf.make_project(tmp_path / "p", wf.tiny_params())
    manifest = root / paths.manifest("random_r0.5", 0)
    _truncated_manifest(manifest)
    planned = wf.snakemake(root, "--dry-run", str(paths.model("random_r0.5", 0)))
    assert not manifest.exists() and manifest.with_name("manifest.parquet.corrupt").exists()
    assert "rule select:" in planned.stdout + planned.stderr  # the rule that rebuilds it
    # the train job checks again before reading: one line naming the path, and moved aside
    _truncated_manifest(manifest)
    with pytest.raises(DataError, match=rf"manifest {manifest} is damaged .* rule select rebuilds"):
        read_manifest(manifest)
    assert not manifest.exists()


def _cluster_meta(tmp_path: Path, embeddings: np.ndarray) -> dict:
    """clusters.json of the cluster script on `embeddings` (k = 3)."""
    path = tmp_path / "embeddings.npy"
    io.save_npy(path, embeddings)
    io.save_json(tmp_path / "embeddings.json", {"model": "test", "seconds": 0.0})
    smk = fake_snakemake(
        input=files(embeddings=path, embeddings_meta=tmp_path / "embeddings.json"),
        output=files(
            clusters=tmp_path / "clusters.parquet",
            centroids=tmp_path / "centroids.npy",
            meta=tmp_path / "clusters.json",
        ),
        params={"cluster": {"k": 3, "iterations": 10, "seed": 0, "device": "cpu"}},
        log=tmp_path / "cluster.log",
    )
    run_script("cluster", smk)
    return io.load_json(tmp_path / "clusters.json")


def test_identical_images_give_degenerate_clusters_warned_in_clusters_json(tmp_path):
    """Identical embeddings: every distance 0, "furthest" would keep sample-id order silently.
    clusters.json says so and the log warns; the report puts the warning at its top
    (tests/test_claims.py::test_report_shows_failed_runs_and_kept_fractions)."""
    rng = np.random.default_rng(0)
    normal = _cluster_meta(tmp_path / "normal", rng.normal(size=(60, 8)).astype(np.float32))
    assert normal["degenerate"]["warning"] is None
    same = _cluster_meta(tmp_path / "same", np.ones((60, 8), np.float32))
    record = same["degenerate"]
    assert record["clusters_without_spread"] and record["tied_distance_share"] > 0.9
    assert record["warning"].startswith("degenerate k-means clusters: ")
    assert "sample-id order" in record["warning"]
    assert (
        f"WARNING diffprune.degenerate: {record['warning']}"
        in (tmp_path / "same" / "cluster.log").read_text()
    )
