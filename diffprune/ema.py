"""The EMA of a model's weights, which sampling uses: its decay schedule and its update."""

from __future__ import annotations

import torch


def ema_decay(cfg: dict, step: int) -> float:
    """cfg["ema_decay"] with diffusers EMAModel's default warm-up, (1 + step) / (10 + step): early
    weights fade quickly, which matters for short runs (a 0.995 EMA over 400 steps would
    otherwise still carry the untrained start)."""
    return min(cfg["ema_decay"], (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, *, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, in two multi-tensor kernels (as torch.optim's
    foreach paths): a per-parameter loop would launch two GPU kernels per tensor every step."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    if len(ema_params) != len(params):
        raise ValueError(f"EMA has {len(ema_params)} parameter tensors, the model {len(params)}")
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)
