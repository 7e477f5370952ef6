"""Pick the compute device: CUDA when present, CPU otherwise."""

import torch

from diffprune.errors import ConfigError


def resolve_device(name: str = "auto", *, key: str = "device") -> torch.device:
    """Map "auto" | "cpu" | "cuda" | "cuda:N" to a torch.device; "auto" prefers CUDA. `key`: the
    params key the name comes from, named when CUDA is asked for and missing (the parse checks
    this before any job where jobs run locally; on a cluster only the node can tell)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{key} = {name!r}: no CUDA device is visible on this machine; use auto or cpu"
        )
    return device
