"""Pick the compute device: CUDA when present, CPU otherwise."""

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """Map "auto" | "cpu" | "cuda" | "cuda:N" to a torch.device; "auto" prefers CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} requested but CUDA is not available; use 'auto' or 'cpu'"
        )
    return device
