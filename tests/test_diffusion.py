import warnings

import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel
from torch.func import functional_call, grad, vmap

from diffprune.diffusion import (
    DIT_SIZES,
    FlowMatchingScheduler,
    build_model,
    build_scheduler,
    dit_config,
    draw,
    null_label,
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


TINY_DIT = {"depth": 2, "width": 32, "heads": 2, "patch": 2}


def tiny(**overrides):
    return {**TINY, **overrides}


def tiny_dit(**overrides):
    """A two-block DiT on 8 x 8 inputs; no UNet keys, which a DiT does not need."""
    cfg = {k: v for k, v in TINY.items() if k not in ("block_channels", "layers_per_block")}
    return {**cfg, "model": "dit", "dit_size": "custom", "dit": TINY_DIT, **overrides}


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
        ({"model": "vit"}, "train.model = 'vit' is not allowed; allowed: unet2d, dit"),
        ({"objective": "edm"}, "train.objective = 'edm' is not allowed"),
        ({"resolution": 6, "block_channels": [8, 16, 32]}, "input size 6 .* must be divisible"),
        ({"conditional": True}, "train.conditional = true: needs train.model dit"),
        ({"model": "dit", "dit_size": "M/3"}, "train.dit_size = 'M/3' is not allowed"),
        ({"model": "dit", "dit_size": "custom"}, "train.dit_size custom needs train.dit"),
        ({"model": "dit", "dit_size": "custom", "dit": {**TINY_DIT, "heads": 3}}, "divisible by"),
        ({"model": "dit", "dit_size": "custom", "resolution": 7, "dit": TINY_DIT}, "patch size 2"),
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
    assert cfg["conditional"] is False and cfg["label_dropout"] == 0.1
    assert cfg["dit_size"] == "S/2" and cfg["dit"] is None
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
            # vmap's batched kernels against batch-1 ones: float32 sums in another order; at
            # atol 1e-6 the largest gap here was 0.83 of the tolerance (as the DiT test: 1e-5)
            assert torch.allclose(grads[name][i], param.grad, atol=1e-5), name


@pytest.mark.parametrize(
    ("size", "depth", "width", "heads"),
    [("S/2", 12, 384, 6), ("B/2", 12, 768, 12), ("L/2", 24, 1024, 16), ("XL/2", 28, 1152, 16)],
)
def test_dit_sizes_are_the_papers(size, depth, width, heads):
    config = dit_config(tiny_dit(dit_size=size), in_channels=4, sample_size=32, num_classes=1000)
    assert config["num_layers"] == depth and config["patch_size"] == 2
    assert config["num_attention_heads"] == heads
    assert config["num_attention_heads"] * config["attention_head_dim"] == width
    assert config["in_channels"] == config["out_channels"] == 4  # no learned sigma
    assert config["sample_size"] == 32 and config["num_embeds_ada_norm"] == 1000
    assert DIT_SIZES[size] == {"depth": depth, "width": width, "heads": heads, "patch": 2}


def test_dit_s2_parameter_count():
    """diffusers' DiT-S/2 on 32x32x4 latents with 1000 classes: the paper's 33M plus, because
    diffusers gives every block its own timestep and label embedder, 11 more of those (0.63M
    each at width 384). Built on the meta device: no memory, no initialisation."""
    cfg = resolve_config(tiny_dit(dit_size="S/2"))
    with torch.device("meta"):
        model = DiTTransformer2DModel(**dit_config(cfg, 4, 32, 1000))
    n = sum(p.numel() for p in model.parameters())
    width = 384
    embedders = (256 * width + width) + (width * width + width) + 1001 * width
    assert n - 11 * embedders == pytest.approx(33e6, rel=0.01)
    assert n == 32_858_896 + 11 * embedders


def test_tiny_dit_builds_with_the_papers_initialisation():
    torch.manual_seed(0)
    model = build_model(tiny_dit(), in_channels=4, num_classes=3)
    assert isinstance(model, DiTTransformer2DModel)
    assert model.config.num_layers == 2 and model.config.patch_size == 2
    assert model.config.num_attention_heads * model.config.attention_head_dim == 32
    assert model.config.sample_size == 8 and null_label(model) == 3
    x, t, labels = batch(channels=4), torch.tensor([3, 50, 999, 0]), torch.tensor([0, 1, 2, 3])
    assert torch.equal(model(x, t, class_labels=labels).sample, torch.zeros_like(x))  # adaLN-Zero
    for block in model.transformer_blocks:
        assert not block.norm1.linear.weight.any()
        table = block.norm1.emb.class_embedder
        assert table.embedding_table.num_embeddings == 4  # 3 classes + the null label
        assert table.dropout_prob == 0  # no label dropout inside the network


def test_dit_maps_inputs_to_same_shape_and_drops_no_labels_itself():
    model = random_dit(in_channels=4, num_classes=3).train()
    x, t, labels = batch(channels=4), torch.tensor([3, 50, 999, 0]), torch.tensor([0, 1, 2, 2])
    out = model(x, t, class_labels=labels).sample
    assert out.shape == x.shape
    assert torch.equal(out, model(x, t, class_labels=labels).sample)  # training mode, no dropout
    null = model(x, t, class_labels=torch.full((4,), 3)).sample
    assert not torch.allclose(out, null)  # the label matters


def random_dit(in_channels=1, num_classes=0, seed=0):
    """A tiny DiT with random weights everywhere (the paper's zero initialisation makes every
    output 0, which would hide the labels' and timesteps' effects)."""
    torch.manual_seed(seed)
    model = build_model(tiny_dit(), in_channels=in_channels, num_classes=num_classes)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_dit_per_sample_gradients_with_labels_under_torch_func(objective):
    """scores.py's contract with class labels: vmap(grad) equals a loop over samples."""
    model = random_dit(num_classes=3)
    scheduler = build_scheduler(tiny_dit(objective=objective))
    x0 = batch(n=3)
    noise, t = draw(x0, scheduler, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 3])  # 3: the null label
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, x, n, ti, label):
        net = lambda xt, tt, **kw: functional_call(model, p, (xt, tt), kw)  # noqa: E731
        return per_sample_loss(
            net, scheduler, x[None], noise=n[None], timesteps=ti[None], objective=objective,
            class_labels=label[None],
        )[0]  # fmt: skip

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))(params, x0, noise, t, labels)
    for i in range(3):
        model.zero_grad()
        per_sample_loss(
            model, scheduler, x0[i : i + 1], noise=noise[i : i + 1], timesteps=t[i : i + 1],
            objective=objective, class_labels=labels[i : i + 1],
        ).sum().backward()  # fmt: skip
        for name, param in model.named_parameters():
            expected = torch.zeros_like(param) if param.grad is None else param.grad
            assert torch.allclose(grads[name][i], expected, atol=1e-5), name
