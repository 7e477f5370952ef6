"""Model and noise-schedule construction, and the per-sample training loss of both objectives.

Two objectives (``cfg["objective"]``):

- ``"ddpm"``: epsilon prediction with diffusers' ``DDPMScheduler`` (``num_train_timesteps`` steps,
  ``beta_schedule`` betas from 1e-4 to 0.02, diffusers' defaults = Ho et al. 2020). Timesteps are
  integers in ``[0, num_train_timesteps)``.
- ``"flow"``: flow matching on the linear path of the paper. With ``x1`` the data and ``x0``
  Gaussian noise, ``x_t = t * x1 + (1 - t) * x0`` for ``t ~ U[0, 1)`` and the model predicts the
  velocity ``x1 - x0`` (MSE). ``t = 0`` is pure noise, ``t = 1`` is data (the opposite direction of
  diffusers' ``FlowMatchEulerDiscreteScheduler``, which is why we keep our own tiny scheduler). The
  network sees the timestep ``t * num_train_timesteps`` (``t * 1000`` by default), so its sinusoidal
  embedding covers the same range as under DDPM.

Naming: in this module ``x0`` is always the CLEAN DATA batch (diffusers' convention), whatever the
objective; the flow formula above uses the paper's names only in this docstring.

``per_sample_loss`` is written to run under ``torch.func`` (``functional_call`` + ``vmap(grad)``)
for per-sample gradients: no in-place ops on inputs, no data-dependent control flow, no ``.item()``.
``model`` may be any callable ``model(x_t, timestep)`` that returns a tensor or an object with a
``.sample`` tensor (diffusers models), e.g. ``lambda x, t: functional_call(net, params, (x, t))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffprune.errors import ConfigError

OBJECTIVES = ("ddpm", "flow")

# Optional keys of params["train"] (the schema does not require them) and their values when absent.
# `resolve_config` fills them in, so the saved config and its hash always hold every value used.
DEFAULTS: dict[str, Any] = {
    "attention": False,
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "weight_decay": 0.0,
    "mixed_precision": "auto",
    "device": "auto",
}
REQUIRED = (
    "model", "objective", "resolution", "block_channels", "layers_per_block", "steps",
    "batch_size", "lr", "ema_decay", "checkpoint_every", "log_every",
)  # fmt: skip


class FlowMatchingScheduler(SchedulerMixin, ConfigMixin):
    """The flow-matching "schedule": only the scale that maps t in [0, 1] to the network's timestep.

    A diffusers config object, so it is saved and loaded next to the model like ``DDPMScheduler``.
    Sampling (Euler steps on the ODE) lives in ``diffprune.sample``.
    """

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000):
        pass

    def timestep_input(self, t: torch.Tensor) -> torch.Tensor:
        """Continuous time t in [0, 1] (0 = noise, 1 = data) -> the network's timestep input."""
        return t * self.config.num_train_timesteps


Scheduler = DDPMScheduler | FlowMatchingScheduler


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the model registry.

    ``build(cfg, in_channels)`` makes a fresh random-weight network; ``cls.from_pretrained``
    loads it back from ``<model_dir>/<subfolder>`` (the component name in diffusers' pipeline
    layout).
    """

    build: Callable[[dict, int], torch.nn.Module]
    cls: type
    subfolder: str


def _build_unet2d(cfg: dict, in_channels: int) -> UNet2DModel:
    channels = tuple(int(c) for c in cfg["block_channels"])
    levels = len(channels)
    if cfg["resolution"] % 2 ** (levels - 1):
        raise ConfigError(
            f"train.resolution {cfg['resolution']} must be divisible by 2**(len(block_channels)-1)"
            f" = {2 ** (levels - 1)}"
        )
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if cfg["attention"]:  # self-attention only at the lowest resolution (cheap on CPU)
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=cfg["resolution"],
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=channels,
        layers_per_block=cfg["layers_per_block"],
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        add_attention=cfg["attention"],
        # GroupNorm needs a group count that divides every width: 32 (the default) when it can.
        norm_num_groups=math.gcd(32, *channels),
    )


# "dit" (diffusers DiTTransformer2DModel on VAE latents) slots in here with subfolder "transformer";
# it also needs an encode/decode step around the network, added with it.
MODELS: dict[str, ModelSpec] = {
    "unet2d": ModelSpec(build=_build_unet2d, cls=UNet2DModel, subfolder="unet"),
}


def resolve_config(cfg: dict) -> dict:
    """params["train"] with optional keys filled from DEFAULTS; checks keys and choices."""
    missing = [key for key in REQUIRED if key not in cfg]
    if missing:
        raise ConfigError(f"train config is missing {missing}; required keys: {list(REQUIRED)}")
    cfg = {**DEFAULTS, **cfg}
    if cfg["model"] not in MODELS:
        raise ConfigError(f"train.model {cfg['model']!r} is unknown; choose from {list(MODELS)}")
    if cfg["objective"] not in OBJECTIVES:
        raise ConfigError(
            f"train.objective {cfg['objective']!r} is unknown; choose from {OBJECTIVES}"
        )
    return cfg


def build_model(cfg: dict, *, in_channels: int) -> torch.nn.Module:
    """A fresh network for images with `in_channels` channels (weights from torch's global RNG)."""
    cfg = resolve_config(cfg)
    return MODELS[cfg["model"]].build(cfg, in_channels)


def build_scheduler(cfg: dict) -> Scheduler:
    """DDPMScheduler (epsilon prediction) for "ddpm"; FlowMatchingScheduler for "flow"."""
    cfg = resolve_config(cfg)
    if cfg["objective"] == "flow":
        return FlowMatchingScheduler(num_train_timesteps=cfg["num_train_timesteps"])
    return DDPMScheduler(
        num_train_timesteps=cfg["num_train_timesteps"],
        beta_schedule=cfg["beta_schedule"],
        prediction_type="epsilon",
    )


def scheduler_class(objective: str) -> type:
    """The scheduler class that `build_scheduler` makes for an objective (for loading)."""
    return FlowMatchingScheduler if objective == "flow" else DDPMScheduler


def objective_of(scheduler: Scheduler) -> str:
    return "flow" if isinstance(scheduler, FlowMatchingScheduler) else "ddpm"


def draw(
    x0: torch.Tensor, scheduler_or_cfg: Scheduler | dict, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise shaped like `x0` and one timestep per sample, on `x0`'s device.

    DDPM: integer timesteps, uniform on [0, num_train_timesteps). Flow: float t, uniform on [0, 1).
    Draws on the generator's device and moves the result, so a CPU generator gives the same draws
    whatever device `x0` lives on.
    """
    scheduler = scheduler_or_cfg
    if isinstance(scheduler, dict):
        scheduler = build_scheduler(scheduler)
    batch = x0.shape[0]
    on = generator.device
    noise = torch.randn(x0.shape, generator=generator, device=on, dtype=torch.float32)
    if isinstance(scheduler, FlowMatchingScheduler):
        timesteps = torch.rand(batch, generator=generator, device=on)
    else:
        steps = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (batch,), generator=generator, device=on)
    return noise.to(x0.device, x0.dtype), timesteps.to(x0.device)


def fixed_timestep(scheduler: Scheduler, index: int) -> int | float:
    """Model time for a fixed-t score, from a DDPM-style index in [0, num_train_timesteps).

    DDPM: the index itself. Flow: ``t = 1 - index / num_train_timesteps`` (t = 1 is data), the same
    fraction of the way from data to noise, so the reference's 15 of 1000 is t = 0.985 (nearly clean
    data) under both objectives. It matches that fraction, not the noise level: DDPM's linear
    schedule at 15 has noise std 0.06, flow at 0.985 has 0.015.
    """
    steps = scheduler.config.num_train_timesteps
    if not 0 <= index < steps:
        raise ValueError(f"timestep {index} must be an integer in [0, num_train_timesteps={steps})")
    if isinstance(scheduler, FlowMatchingScheduler):
        return 1 - index / steps
    return int(index)


def per_sample_loss(
    model: Callable,
    scheduler: Scheduler,
    x0: torch.Tensor,
    *,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    objective: str = "ddpm",
) -> torch.Tensor:
    """Training loss of each sample, shape (B,): MSE over C, H, W, computed in float32.

    Deterministic given `noise` and `timesteps` (from `draw`) and differentiable in the model's
    parameters. `objective` must match the scheduler (a guard against mixing configs).
    """
    if objective != objective_of(scheduler):
        raise ValueError(
            f"objective {objective!r} does not match scheduler {type(scheduler).__name__}; "
            f"use objective={objective_of(scheduler)!r}"
        )
    if objective == "flow":
        t = timesteps.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
        x_t = t * x0 + (1 - t) * noise
        pred = _predict(model, x_t, scheduler.timestep_input(timesteps))
        target = x0 - noise
    else:
        x_t = scheduler.add_noise(x0, noise, timesteps)
        pred = _predict(model, x_t, timesteps)
        target = noise
    return (pred.float() - target.float()).square().flatten(1).mean(1)


def _predict(model: Callable, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    out = model(x, timestep)
    return getattr(out, "sample", out)
