"""Devices and GPUs that params.yaml asks for, checked before any job (config's checks).

A `*.device: cuda[:i]` must name a visible CUDA device (torch is imported only when one is asked
for), and where Snakemake declares a GPU limit (`--resources gpu=N`, e.g. from a profile), no job
may ask for more: a training of train.num_processes processes, or a shard job's one GPU.
"""

from __future__ import annotations

from typing import Any

from diffprune.defaults import with_defaults
from diffprune.errors import ConfigError

# Sections with a `device` key.
DEVICE_SECTIONS = ("embed", "cluster", "scores", "train", "autoencoder", "classifier", "evaluate")
# (section, shard key, (section, key) of the device the rule's GPU request follows) of the stages
# sharded beside embed: each shard job asks for one GPU unless that device is cpu.
SHARDED_GPU_JOBS = (
    ("autoencoder", "encode_shards", ("autoencoder", "device")),
    ("scores", "shards", ("train", "device")),
)


def device_problems(params: dict[str, Any]) -> list[str]:
    """CUDA devices asked for must be visible; torch is imported only when one is asked for."""
    wanted = {
        f"{section}.device": params[section]["device"]
        for section in DEVICE_SECTIONS
        if params[section].get("device", "auto").startswith("cuda")
    }
    if not wanted:
        return []
    visible = _cuda_devices()
    return [
        f"{key} = {device!r}: {_missing_device(visible)}; use auto or cpu"
        for key, device in wanted.items()
        if int(device.partition(":")[2] or 0) >= visible
    ]


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _missing_device(visible: int) -> str:
    if visible == 0:
        return "no CUDA device is visible"
    return f"only {visible} CUDA device(s) are visible, cuda:0 .. cuda:{visible - 1}"


def gpu_request_problems(params: dict[str, Any], gpus: int | None) -> list[str]:
    """Jobs that ask for more GPUs than one node declares (Snakemake's `--resources gpu=N`, e.g.
    from a profile): a training of train.num_processes processes, or an embed (shard) job, which
    asks for one. Named at parse time, before any job is submitted to wait forever in a queue.
    `gpus` None: nothing declared, nothing to check."""
    if gpus is None:
        return []
    limit = f"more GPUs than declared (--resources gpu={gpus}); allowed: at most {gpus}"
    problems = []
    train = params.get("train", {})
    processes = train.get("num_processes", 1)
    if train.get("device") != "cpu" and processes > gpus:
        problems.append(f"train.num_processes = {processes}: {processes} {limit}")
    embed = params.get("embed", {})
    if embed.get("device") != "cpu" and gpus < 1:
        shards = with_defaults("embed", embed)["shards"]
        problems.append(f"embed.shards = {shards}: each embed job asks for 1 GPU, {limit}")
    for section, key, device in SHARDED_GPU_JOBS:
        shards = with_defaults(section, params.get(section, {}))[key]
        if shards > 1 and params.get(device[0], {}).get(device[1]) != "cpu" and gpus < 1:
            problems.append(f"{section}.{key} = {shards}: each shard job asks for 1 GPU, {limit}")
    return problems


def check_gpu_requests(params: dict[str, Any], gpus: int | None, *, source: str) -> None:
    """Raise ConfigError, one line per job kind, when `gpu_request_problems` finds any."""
    if problems := gpu_request_problems(params, gpus):
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems))
