"""Model-FLOPs utilisation (MFU): the share of an accelerator's peak that a training run uses.

MFU counts only the model's own arithmetic (`flops_per_image`: forward plus backward, counted as
3x the forward pass, `TRAIN_FLOPS_PER_FORWARD`), not recomputation or optimizer work, so runs on
different hardware and software compare on the same footing (PaLM, Chowdhery et al. 2022,
appendix B). The forward pass is counted by `torch.utils.flop_counter.FlopCounterMode`
(`forward_flops`), which counts matrix products and convolutions (2 FLOPs per multiply-add) and
nothing else; training (diffprune.train) and benchmarks/gpu_check.py both use it.

Peaks (`bf16_peak`) are the datasheets' dense BF16 tensor-core figures (without 2:4 sparsity,
which doubles the printed number), for the GPUs named in `BF16_DENSE_PEAKS`; no peak is assumed
for any other device, the CPU included.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

#: Training FLOPs per forward-pass FLOP: the forward, plus a backward of about twice its cost
#: (gradients of the activations and of the weights).
TRAIN_FLOPS_PER_FORWARD = 3

#: NVIDIA H200 SXM dense BF16 tensor-core peak, FLOP/s (989 TFLOP/s without sparsity; the
#: datasheet's 1,979 is with 2:4 sparsity). https://www.nvidia.com/en-us/data-center/h200/
H200_BF16_DENSE_PEAK = 989e12

#: Dense BF16 peaks, FLOP/s, by a substring of torch.cuda.get_device_name; the first match counts,
#: so the longer names come first. Datasheet figures printed with sparsity are halved (rounded down
#: to whole TFLOP/s, as NVIDIA quotes the dense figures).
BF16_DENSE_PEAKS: tuple[tuple[str, float, str], ...] = (
    # H200 NVL: 1,671 TFLOP/s with sparsity
    ("H200 NVL", 835e12, "https://www.nvidia.com/en-us/data-center/h200/"),
    # H200 SXM ("NVIDIA H200"): 1,979 with sparsity
    ("H200", H200_BF16_DENSE_PEAK, "https://www.nvidia.com/en-us/data-center/h200/"),
    # H100 NVL: 1,671 with sparsity
    ("H100 NVL", 835e12, "https://www.nvidia.com/en-us/data-center/h100/"),
    # H100 PCIe: 1,513 with sparsity
    ("H100 PCIe", 756e12, "https://www.nvidia.com/en-us/data-center/h100/"),
    # H100 SXM ("NVIDIA H100 80GB HBM3"): 1,979 with sparsity
    ("H100", 989e12, "https://www.nvidia.com/en-us/data-center/h100/"),
    # A100, SXM and PCIe, 40 and 80 GB: 312 dense (624 with sparsity)
    ("A100", 312e12, "https://www.nvidia.com/en-us/data-center/a100/"),
)


def mfu(flops_per_image: float, images_per_s: float, peak: float = H200_BF16_DENSE_PEAK) -> float:
    """Achieved model FLOP/s (`flops_per_image * images_per_s`) as a fraction of `peak` FLOP/s."""
    for name, value in (("flops_per_image", flops_per_image), ("images_per_s", images_per_s)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} = {value!r}; must be a finite number >= 0")
    if not math.isfinite(peak) or peak <= 0:
        raise ValueError(f"peak = {peak!r}; must be a finite number > 0 (FLOP/s)")
    return flops_per_image * images_per_s / peak


def bf16_peak(device_name: str) -> tuple[float, str] | None:
    """(dense BF16 peak in FLOP/s, its datasheet) of a GPU named like torch.cuda.get_device_name
    ("NVIDIA H200", "NVIDIA A100-SXM4-80GB"), or None when the table does not know it."""
    for part, peak, source in BF16_DENSE_PEAKS:
        if part in device_name:
            return peak, source
    return None


def device_peak(device: torch.device) -> tuple[float | None, str]:
    """(dense BF16 peak of `device` or None, a note that names it or says why there is none)."""
    if device.type != "cuda":
        return None, f"no known bf16 peak for {device.type}"
    name = torch.cuda.get_device_name(device)
    known = bf16_peak(name)
    if known is None:
        return None, f"no known bf16 peak for {name} (diffprune.throughput.BF16_DENSE_PEAKS)"
    peak, source = known
    return peak, f"{name}: dense bf16 peak {peak / 1e12:g} TFLOP/s ({source})"


def forward_flops(
    model: torch.nn.Module,
    x: torch.Tensor,
    timestep: torch.Tensor,
    class_labels: torch.Tensor | None = None,
) -> float:
    """FLOPs of one forward pass of a diffusion network per image, counted on the batch `x`
    (`model(x, timestep=..., class_labels=...)`, labels only when given)."""
    labels = {} if class_labels is None else {"class_labels": class_labels}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, timestep=timestep, **labels)
    return counter.get_total_flops() / len(x)
