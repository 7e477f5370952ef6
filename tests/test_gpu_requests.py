"""Jobs asking for more GPUs than a node declares are named at parse time, before submission."""

from __future__ import annotations

import subprocess
import sys

import yaml

from diffprune.config import gpu_request_problems
from tests.workflow_helpers import ENV, REPO


def test_more_processes_or_shard_gpus_than_declared_name_the_key_and_limit():
    params = {"train": {"device": "auto", "num_processes": 4}, "embed": {"device": "cuda"}}
    assert gpu_request_problems(params, None) == []  # nothing declared: nothing to check
    assert gpu_request_problems(params, 4) == []
    assert gpu_request_problems(params, 2) == [
        "train.num_processes = 4: 4 more GPUs than declared (--resources gpu=2); allowed: at most 2"
    ]
    problems = gpu_request_problems({**params, "embed": {"device": "cuda", "shards": 3}}, 0)
    assert problems[1].startswith("embed.shards = 3: each embed job asks for 1 GPU")
    cpu = {"train": {"device": "cpu", "num_processes": 4}, "embed": {"device": "cpu"}}
    assert gpu_request_problems(cpu, 0) == []  # CPU jobs ask for no GPU


def test_snakemake_stops_at_parse_time_naming_train_num_processes(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    overlay.write_text(yaml.safe_dump({"train": {**params["train"], "num_processes": 2}}))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--resources", "gpu=1"]
    result = subprocess.run(
        [*cmd, "--configfile", str(overlay)], cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert (
        "train.num_processes = 2: 2 more GPUs than declared (--resources gpu=1)"
        in result.stdout + result.stderr
    )


def test_encode_and_score_shards_asking_for_gpus_beyond_declared_name_their_key():
    params = {
        "train": {"device": "cuda"}, "embed": {"device": "cpu"},
        "autoencoder": {"device": "cuda", "encode_shards": 2}, "scores": {"shards": 3},
    }  # fmt: skip
    limit = "more GPUs than declared (--resources gpu=0); allowed: at most 0"
    assert gpu_request_problems(params, 0) == [
        f"train.num_processes = 1: 1 {limit}",
        f"autoencoder.encode_shards = 2: each shard job asks for 1 GPU, {limit}",
        f"scores.shards = 3: each shard job asks for 1 GPU, {limit}",
    ]
    assert gpu_request_problems(params, 1) == []
    unsharded = {**params, "autoencoder": {"device": "cuda"}, "scores": {}}
    assert gpu_request_problems(unsharded, 0) == [f"train.num_processes = 1: 1 {limit}"]
