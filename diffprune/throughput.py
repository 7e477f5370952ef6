"""Model-FLOPs utilisation (MFU): the share of an accelerator's peak that a training run uses.

MFU counts only the model's own arithmetic (`flops_per_image`: forward plus backward, usually 3x
the forward pass), not recomputation or optimizer work, so runs on different hardware and
software compare on the same footing (PaLM, Chowdhery et al. 2022, appendix B).
"""

from __future__ import annotations

import math

#: NVIDIA H200 SXM dense BF16 tensor-core peak, FLOP/s (989 TFLOP/s without sparsity; the
#: datasheet's 1,979 is with 2:4 sparsity). https://www.nvidia.com/en-us/data-center/h200/
H200_BF16_DENSE_PEAK = 989e12


def mfu(flops_per_image: float, images_per_s: float, peak: float = H200_BF16_DENSE_PEAK) -> float:
    """Achieved model FLOP/s (`flops_per_image * images_per_s`) as a fraction of `peak` FLOP/s."""
    for name, value in (("flops_per_image", flops_per_image), ("images_per_s", images_per_s)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} = {value!r}; must be a finite number >= 0")
    if not math.isfinite(peak) or peak <= 0:
        raise ValueError(f"peak = {peak!r}; must be a finite number > 0 (FLOP/s)")
    return flops_per_image * images_per_s / peak
