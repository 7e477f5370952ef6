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

Two networks (``cfg["model"]``, the ``MODELS`` registry): ``"unet2d"``, diffusers' pixel-space
``UNet2DModel`` (unconditional), and ``"dit"``, diffusers' ``DiTTransformer2DModel`` (Peebles & Xie
2023) in one of the DiT paper's sizes (``DIT_SIZES``) or a custom one, on images or on autoencoder
latents. DiT is conditioned on a class label; index ``num_classes`` of its label table is the null
label of classifier-free guidance, and an unconditional DiT is one with ``num_classes = 0`` whose
every label is the null label. diffusers drops labels inside the model (``LabelEmbedding``, p = 0.1
from the global RNG, independently in every block); `disable_label_dropout` turns that off, and
the training loop drops labels itself from its seeded generator.

``per_sample_loss`` is written to run under ``torch.func`` (``functional_call`` + ``vmap(grad)``)
for per-sample gradients: no in-place ops on inputs, no data-dependent control flow, no ``.item()``.
``model`` may be any callable ``model(x_t, timestep)`` (``model(x_t, timestep, class_labels=...)``
when labels are given) that returns a tensor or an object with a ``.sample`` tensor (diffusers
models), e.g. ``lambda x, t: functional_call(net, params, (x, t))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import LabelEmbedding
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffprune.config import conditional_problem, value_problems
from diffprune.defaults import DIT_SIZES, with_defaults
from diffprune.errors import ConfigError

REQUIRED = (
    "model", "objective", "resolution", "steps", "batch_size", "lr", "ema_decay",
    "checkpoint_every", "log_every",
)  # fmt: skip
# Keys a model needs on top of REQUIRED.
MODEL_REQUIRED = {"unet2d": ("block_channels", "layers_per_block"), "dit": ()}

DIT_KEYS = ("depth", "width", "heads", "patch")


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

    ``build(cfg, in_channels, sample_size, num_classes)`` makes a fresh random-weight network for
    square inputs of `sample_size` pixels (or latent pixels); ``cls.from_pretrained`` loads it back
    from ``<model_dir>/<subfolder>`` (the component name in diffusers' pipeline layout).
    ``class_labels``: whether the network takes ``class_labels`` (DiT always does).
    """

    build: Callable[[dict, int, int, int], torch.nn.Module]
    cls: type
    subfolder: str
    class_labels: bool


def _build_unet2d(cfg: dict, in_channels: int, sample_size: int, num_classes: int) -> UNet2DModel:
    channels = tuple(int(c) for c in cfg["block_channels"])
    levels = len(channels)
    if sample_size % 2 ** (levels - 1):
        raise ConfigError(
            f"the input size {sample_size} (train.resolution, or the latents' size) must be"
            f" divisible by 2**(len(block_channels)-1) = {2 ** (levels - 1)}"
        )
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if cfg["attention"]:  # self-attention only at the lowest resolution (cheap on CPU)
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=sample_size,
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


def dit_shape(cfg: dict) -> dict[str, int]:
    """depth, width, heads and patch of the DiT that `cfg` asks for (train.dit_size, train.dit)."""
    if cfg["dit_size"] != "custom":
        return DIT_SIZES[cfg["dit_size"]]
    shape = cfg["dit"] or {}
    missing = [key for key in DIT_KEYS if key not in shape]
    if missing:
        raise ConfigError(f"train.dit_size custom needs train.dit with {list(DIT_KEYS)}: {missing}")
    if shape["width"] % shape["heads"]:
        raise ConfigError(
            f"train.dit.width {shape['width']} must be divisible by train.dit.heads"
            f" {shape['heads']}"
        )
    return {key: int(shape[key]) for key in DIT_KEYS}


def dit_config(cfg: dict, in_channels: int, sample_size: int, num_classes: int) -> dict[str, Any]:
    """The `DiTTransformer2DModel` arguments: the DiT paper's network, predicting only the
    velocity or noise (out_channels = in_channels, no learned sigma)."""
    shape = dit_shape(cfg)
    if sample_size % shape["patch"]:
        raise ConfigError(
            f"the input size {sample_size} (train.resolution, or the latents' size) must be"
            f" divisible by the DiT patch size {shape['patch']}"
        )
    return {
        "num_layers": shape["depth"],
        "num_attention_heads": shape["heads"],
        "attention_head_dim": shape["width"] // shape["heads"],
        "patch_size": shape["patch"],
        "in_channels": in_channels,
        "out_channels": in_channels,
        "sample_size": sample_size,
        "num_embeds_ada_norm": num_classes,
        "norm_type": "ada_norm_zero",
    }


def _build_dit(
    cfg: dict, in_channels: int, sample_size: int, num_classes: int
) -> DiTTransformer2DModel:
    return _init_dit(
        DiTTransformer2DModel(**dit_config(cfg, in_channels, sample_size, num_classes))
    )


@torch.no_grad()
def _init_dit(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """The DiT paper's initialisation (``initialize_weights`` in its models.py), which diffusers'
    class leaves to torch's defaults: xavier-uniform linear layers (here q, k and v each, not one
    fused qkv) and patch embedding, N(0, 0.02) label tables and timestep MLPs, and zero adaLN
    modulation and output layers ("adaLN-Zero": every block starts as the identity and the
    network's output as 0). diffusers' DiT has its own timestep and label embedder in every block;
    each gets the paper's initialisation."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            torch.nn.init.zeros_(module.bias)
    patches = model.pos_embed.proj
    torch.nn.init.xavier_uniform_(patches.weight.view(patches.weight.shape[0], -1))
    torch.nn.init.zeros_(patches.bias)
    for block in model.transformer_blocks:
        embed = block.norm1.emb
        torch.nn.init.normal_(embed.class_embedder.embedding_table.weight, std=0.02)
        torch.nn.init.normal_(embed.timestep_embedder.linear_1.weight, std=0.02)
        torch.nn.init.normal_(embed.timestep_embedder.linear_2.weight, std=0.02)
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return model


MODELS: dict[str, ModelSpec] = {
    "unet2d": ModelSpec(build=_build_unet2d, cls=UNet2DModel, subfolder="unet", class_labels=False),
    "dit": ModelSpec(
        build=_build_dit, cls=DiTTransformer2DModel, subfolder="transformer", class_labels=True
    ),
}


def resolve_config(cfg: dict) -> dict:
    """params["train"] with optional keys filled from the schema's defaults (every key the
    training reads, so the saved config and its hash hold every value used); checks keys and
    choices."""
    required = REQUIRED + MODEL_REQUIRED.get(cfg.get("model"), ())
    missing = [key for key in required if key not in cfg]
    if missing:
        raise ConfigError(f"train config is missing {missing}; required keys: {list(required)}")
    cfg = with_defaults("train", cfg)
    problems = value_problems("train", cfg) or [conditional_problem(cfg)]
    if any(problems):
        raise ConfigError("\n".join(filter(None, problems)))
    return cfg


def build_model(
    cfg: dict, *, in_channels: int, sample_size: int | None = None, num_classes: int = 0
) -> torch.nn.Module:
    """A fresh network (weights from torch's global RNG) for square inputs with `in_channels`
    channels and `sample_size` pixels a side (default train.resolution); a DiT gets a label table
    for `num_classes` classes plus the null label (0: unconditional). Label dropout inside the
    network is off (`disable_label_dropout`)."""
    cfg = resolve_config(cfg)
    size = cfg["resolution"] if sample_size is None else sample_size
    return disable_label_dropout(MODELS[cfg["model"]].build(cfg, in_channels, size, num_classes))


def disable_label_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off the label dropout of diffusers' `LabelEmbedding` modules, keeping their null row.

    diffusers builds DiT's label tables with dropout 0.1 (so with the extra null row) and, in
    training mode, drops labels from the global RNG independently in every block; the training
    loop drops them itself instead, reproducibly. Returns `model`.
    """
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def null_label(model: torch.nn.Module) -> int:
    """The null (unconditional) class label of a DiT: its number of classes."""
    return model.config.num_embeds_ada_norm


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
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Training loss of each sample, shape (B,): MSE over C, H, W, computed in float32.

    Deterministic given `noise` and `timesteps` (from `draw`) and differentiable in the model's
    parameters. `objective` must match the scheduler (a guard against mixing configs).
    `class_labels` (int64, (B,)) are passed to the model as ``class_labels=``; a DiT needs them
    (its null label, `null_label`, when unconditional), a UNet takes none.
    """
    if objective != objective_of(scheduler):
        raise ValueError(
            f"objective {objective!r} does not match scheduler {type(scheduler).__name__}; "
            f"use objective={objective_of(scheduler)!r}"
        )
    if objective == "flow":
        t = timesteps.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
        x_t = t * x0 + (1 - t) * noise
        pred = _predict(model, x_t, scheduler.timestep_input(timesteps), class_labels)
        target = x0 - noise
    else:
        x_t = scheduler.add_noise(x0, noise, timesteps)
        pred = _predict(model, x_t, timesteps, class_labels)
        target = noise
    return (pred.float() - target.float()).square().flatten(1).mean(1)


def _predict(
    model: Callable, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None
) -> torch.Tensor:
    labels = {} if class_labels is None else {"class_labels": class_labels}
    out = model(x, timestep, **labels)
    return getattr(out, "sample", out)
