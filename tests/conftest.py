"""Shared fixtures. Tests run single-threaded: tiny models gain nothing from threads, and threads
oversubscribe the 2-core CI machine while the end-to-end tests' Snakemake jobs run beside them."""

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

torch.set_num_threads(1)
threadpool_limits(1)

# The files that run tiny studies, longest first (pytest --durations=25; docs/benchmarks.md). With
# one file per worker (`make test`: --dist loadfile --no-loadscope-reorder) the longest start
# first, so none of them is left running alone at the end while the other cores idle.
LONGEST_FIRST = (
    "test_workflow.py",
    "test_slurm.py",
    "test_remote.py",
    "test_latent_workflow.py",
    "test_train.py",
    "test_faults.py",
    "test_dvc_agreement.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: others keep order


# A two-level UNet on 8 x 8 images, a few steps of DDPM on the CPU: the unit tests' diffusion model.
TINY_UNET = {
    "model": "unet2d",
    "objective": "ddpm",
    "resolution": 8,
    "block_channels": [8, 16],
    "layers_per_block": 1,
    "steps": 6,
    "batch_size": 4,
    "lr": 1e-3,
    "ema_decay": 0.9,
    "checkpoint_every": 100,
    "log_every": 100,
    "mixed_precision": "no",
    "device": "cpu",
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Back to one thread after every test: a workflow script run in-process (logs.setup) may
    raise torch's thread count, and on a busy 2-core machine two threads per process slow the
    tiny models by 10-100x."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_unet_cfg() -> Callable[..., dict[str, Any]]:
    """`tiny_unet_cfg(**overrides)`: TINY_UNET with some keys replaced (a new dict each call)."""

    def make(**overrides: Any) -> dict[str, Any]:
        return {**TINY_UNET, **overrides}

    return make


@pytest.fixture(scope="session")
def tiny_unet() -> Callable[..., torch.nn.Module]:
    """`tiny_unet(cfg, channels=1)`: the model of a train config, random weights from seed 0."""

    def make(cfg: dict[str, Any], channels: int = 1) -> torch.nn.Module:
        from diffprune.diffusion import build_model  # diffusers: only for the tests that use it

        torch.manual_seed(0)
        return build_model(cfg, in_channels=channels)

    return make


@pytest.fixture(scope="session")
def random_images() -> Callable[..., np.ndarray]:
    """`random_images(n, size=8, channels=1, seed=0)`: uniform random uint8 NHWC images."""

    def make(n: int, *, size: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
        shape = (n, size, size, channels)
        return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)

    return make
