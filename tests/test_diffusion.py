import pytest
import torch
from diffusers import DDPMScheduler
from torch.func import functional_call, grad, vmap

from diffprune.diffusion import (
    FlowMatchingScheduler,
    build_model,
    build_scheduler,
    draw,
    per_sample_loss,
    resolve_config,
)
from diffprune.errors import ConfigError

TINY = {
    "model": "unet2d",
    "objective": "ddpm",
    "resolution": 8,
    "block_channels": [8, 16],
    "layers_per_block": 1,
    "steps": 4,
    "batch_size": 4,
    "lr": 1e-3,
    "ema_decay": 0.9,
    "checkpoint_every": 2,
    "log_every": 1,
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides):
    return {**TINY, **overrides}


def batch(n=4, channels=1, seed=0):
    return torch.rand(n, channels, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_build_model_maps_images_to_same_shape(attention, channels):
    torch.manual_seed(0)
    model = build_model(tiny(attention=attention), in_channels=channels)
    assert model.config.sample_size == 8
    assert model.config.in_channels == model.config.out_channels == channels
    assert list(model.config.block_out_channels) == [8, 16]
    assert ("AttnDownBlock2D" in model.config.down_block_types) is attention
    assert ("AttnUpBlock2D" in model.config.up_block_types) is attention
    assert model.config.norm_num_groups == 8  # gcd(32, 8, 16)
    x = batch(channels=channels)
    assert model(x, torch.tensor([3, 50, 999, 0])).sample.shape == x.shape


def test_build_model_is_seeded_by_global_rng():
    torch.manual_seed(1)
    a = build_model(TINY, in_channels=1)
    torch.manual_seed(1)
    b = build_model(TINY, in_channels=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "vit"}, "train.model 'vit' is unknown"),
        ({"objective": "edm"}, "train.objective 'edm' is unknown"),
        ({"resolution": 6, "block_channels": [8, 16, 32]}, "train.resolution 6 must be divisible"),
    ],
)
def test_bad_config_raises_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_model(tiny(**overrides), in_channels=1)
    assert "\n" not in str(err.value)


def test_missing_key_is_named():
    cfg = dict(TINY)
    del cfg["lr"]
    with pytest.raises(ConfigError, match=r"missing \['lr'\]"):
        resolve_config(cfg)


def test_optional_keys_get_documented_defaults():
    cfg = resolve_config(TINY)
    assert cfg["num_train_timesteps"] == 1000 and cfg["beta_schedule"] == "linear"
    assert cfg["attention"] is False and cfg["mixed_precision"] == "auto"
    assert resolve_config(tiny(num_train_timesteps=50))["num_train_timesteps"] == 50


def test_build_scheduler_per_objective():
    ddpm = build_scheduler(tiny(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2"))
    assert isinstance(ddpm, DDPMScheduler)
    assert ddpm.config.num_train_timesteps == 100
    assert ddpm.config.beta_schedule == "squaredcos_cap_v2"
    assert ddpm.config.prediction_type == "epsilon"
    flow = build_scheduler(tiny(objective="flow"))
    assert isinstance(flow, FlowMatchingScheduler)
    assert flow.timestep_input(torch.tensor(0.25)).item() == 250.0


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_draw_is_seeded_and_in_range(objective):
    x0 = batch(n=256)
    scheduler = build_scheduler(tiny(objective=objective))
    noise, t = draw(x0, scheduler, generator=torch.Generator().manual_seed(3))
    noise2, t2 = draw(x0, tiny(objective=objective), generator=torch.Generator().manual_seed(3))
    assert torch.equal(noise, noise2) and torch.equal(t, t2)
    assert noise.shape == x0.shape and t.shape == (256,)
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
    if objective == "ddpm":
        assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 1000
        assert t.unique().numel() > 100
    else:
        assert t.dtype == torch.float32 and t.min() >= 0 and t.max() < 1
    other, _ = draw(x0, scheduler, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(noise, other)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_loss_shape_determinism_and_gradient(objective):
    torch.manual_seed(0)
    model = build_model(tiny(objective=objective), in_channels=1)
    scheduler = build_scheduler(tiny(objective=objective))
    x0 = batch()
    noise, t = draw(x0, scheduler, generator=torch.Generator().manual_seed(0))
    loss = per_sample_loss(model, scheduler, x0, noise=noise, timesteps=t, objective=objective)
    again = per_sample_loss(model, scheduler, x0, noise=noise, timesteps=t, objective=objective)
    assert loss.shape == (4,) and loss.dtype == torch.float32
    assert torch.equal(loss, again)
    assert (loss > 0).all() and len(set(loss.tolist())) == 4  # per sample, not one mean
    loss.sum().backward()
    assert model.conv_in.weight.grad is not None and model.conv_in.weight.grad.abs().sum() > 0


def test_ddpm_loss_follows_the_forward_process():
    """With a network that returns its input, the loss is |sqrt(a)x0 + sqrt(1-a)n - n|^2."""
    scheduler = build_scheduler(TINY)
    x0, noise = batch(), batch(seed=1)
    t = torch.tensor([0, 10, 500, 999])
    loss = per_sample_loss(lambda x, _: x, scheduler, x0, noise=noise, timesteps=t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    assert torch.allclose(loss, (x_t - noise).square().mean((1, 2, 3)))


def test_flow_loss_uses_the_papers_path_and_time_scale():
    """x_t = t*data + (1-t)*noise, target data - noise, network time t*1000."""
    scheduler = build_scheduler(tiny(objective="flow"))
    x0, noise = batch(), batch(seed=1)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    seen = {}

    def net(x, timestep):
        seen["t"] = timestep
        return x

    loss = per_sample_loss(net, scheduler, x0, noise=noise, timesteps=t, objective="flow")
    assert torch.equal(seen["t"], torch.tensor([0.0, 250.0, 500.0, 1000.0]))
    tt = t.view(-1, 1, 1, 1)
    expected = (tt * x0 + (1 - tt) * noise - (x0 - noise)).square().mean((1, 2, 3))
    assert torch.allclose(loss, expected)
    assert torch.allclose(loss[3], noise[3].square().mean())  # t = 1: x_t is the data


def test_objective_must_match_scheduler():
    with pytest.raises(ValueError, match="objective 'ddpm' does not match"):
        per_sample_loss(
            lambda x, _: x,
            build_scheduler(tiny(objective="flow")),
            batch(),
            noise=batch(),
            timesteps=torch.rand(4),
        )


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_per_sample_gradients_with_torch_func(objective):
    """The contract for score methods: functional_call + vmap(grad) equals a loop over samples."""
    torch.manual_seed(0)
    model = build_model(tiny(objective=objective), in_channels=1)
    scheduler = build_scheduler(tiny(objective=objective))
    x0 = batch(n=3)
    noise, t = draw(x0, scheduler, generator=torch.Generator().manual_seed(0))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, x, n, ti):
        net = lambda xt, tt: functional_call(model, p, (xt, tt))  # noqa: E731
        return per_sample_loss(
            net, scheduler, x[None], noise=n[None], timesteps=ti[None], objective=objective
        )[0]

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(params, x0, noise, t)
    for i in range(3):
        model.zero_grad()
        per_sample_loss(
            model, scheduler, x0[i : i + 1], noise=noise[i : i + 1], timesteps=t[i : i + 1],
            objective=objective,
        ).sum().backward()  # fmt: skip
        for name, param in model.named_parameters():
            assert torch.allclose(grads[name][i], param.grad, atol=1e-6), name
