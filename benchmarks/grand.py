"""GraNd per-sample gradient norms: batched torch.func (diffprune.scores.grand) against the
reference's batch-size-1 backward loop (diffprune.scores.grand_loop), same model and samples."""

from __future__ import annotations

import numpy as np
import torch
from rows import row, timed

from diffprune.config import load_params
from diffprune.diffusion import build_model
from diffprune.scores import grand, grand_loop


def bench_grand(n: int = 128, resolution: int = 16, batch_size: int = 64) -> list[dict]:
    """The default study's UNet at `resolution`."""
    cfg = {**load_params()["train"], "resolution": resolution}
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=1)
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    kwargs = {"cfg": cfg, "seed": 0, "progress": False}
    batched_s, batched = timed(lambda: grand(model, images, batch_size=batch_size, **kwargs), 1)
    loop_s, loop = timed(lambda: grand_loop(model, images, **kwargs), 1)
    parameters = sum(p.numel() for p in model.parameters())
    difference = float(np.max(np.abs(batched - loop) / np.abs(loop)))
    return [
        row(
            f"GraNd batched (torch.func, batch {batch_size})",
            baseline="GraNd loop (batch 1, the reference's)",
            value=batched_s, baseline_value=loop_s, unit="s",
            notes=f"{n} samples, default UNet ({parameters:,} parameters) at {resolution} px; "
            f"max relative difference {difference:.1e}",
        )
    ]  # fmt: skip
