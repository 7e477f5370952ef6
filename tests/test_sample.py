import sys
import types

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMPipeline, DDIMScheduler
from PIL import Image

from diffprune.data import to_uint8
from diffprune.diffusion import build_model, build_scheduler
from diffprune.errors import ConfigError, DataError, SamplingFailed
from diffprune.model_folder import load_model, save_model
from diffprune.sample import generate, save_grid, write_samples
from diffprune.status import write_failed_model

TINY = {
    "model": "unet2d",
    "objective": "ddpm",
    "resolution": 8,
    "block_channels": [8, 16],
    "layers_per_block": 1,
    "steps": 1,
    "batch_size": 4,
    "lr": 1e-3,
    "ema_decay": 0.9,
    "checkpoint_every": 1,
    "log_every": 1,
}


SAMPLE = {"num_samples": 5, "steps": 2, "batch_size": 4, "grid_size": 2}
SAMPLE_ARGS = {k: v for k, v in SAMPLE.items() if k != "grid_size"}


def write_model(tmp_path_factory, objective, *, channels=1, nan=False):
    """A random-weight model folder, written and later read by the same code as trained ones."""
    cfg = {**TINY, "objective": objective}
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=channels)
    if nan:
        torch.nn.init.constant_(model.conv_out.bias, float("nan"))
    path = tmp_path_factory.mktemp(objective) / "model"
    save_model(model, build_scheduler(cfg), path, cfg=cfg)
    return path


def write_outputs(model_dir, tmp_path):
    """`write_samples` as the sample rule calls it: (reason, samples, grid picture)."""
    out = {"samples_path": tmp_path / "samples.npy", "grid_path": tmp_path / "grid.png"}
    reason = write_samples(model_dir, cfg=SAMPLE, seed=0, device="cpu", **out)
    return reason, np.load(out["samples_path"]), Image.open(out["grid_path"])


def assert_failed_grid(picture, channels):
    """The size of a 2 x 2 grid of 8-pixel images (or wider, for the text), with white text."""
    assert picture.mode == ("L" if channels == 1 else "RGB")
    assert picture.height == 2 * (8 + 2) + 2 and picture.width >= 2 * (8 + 2) + 2
    pixels = np.asarray(picture.convert("L"))
    assert pixels.max() > 200 and (pixels == 0).mean() > 0.5  # antialiased text


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    return write_model(tmp_path_factory, "ddpm")


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    return write_model(tmp_path_factory, "flow")


@pytest.fixture(params=["ddpm_dir", "flow_dir"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def test_generate_shape_dtype_and_seed(model_dir):
    kwargs = {"num_samples": 5, "steps": 4, "batch_size": 2, "device": "cpu", "progress": False}
    a = generate(model_dir, seed=0, **kwargs)
    b = generate(model_dir, seed=0, **kwargs)
    c = generate(model_dir, seed=1, **kwargs)
    assert a.shape == (5, 8, 8, 1) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a.reshape(5, -1), axis=0)) == 5  # every sample has its own noise
    whole = generate(model_dir, seed=0, **{**kwargs, "batch_size": 5})
    assert np.abs(whole.astype(int) - a).max() <= 1  # noise does not depend on batch_size


def test_ddim_matches_diffusers_ddim_pipeline(ddpm_dir):
    model, scheduler, _ = load_model(ddpm_dir)
    ours = generate(ddpm_dir, num_samples=3, steps=5, seed=7, device="cpu", progress=False)
    pipeline = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(scheduler.config))
    theirs = pipeline(
        batch_size=3,
        generator=torch.Generator().manual_seed(7),
        eta=0.0,
        num_inference_steps=5,
        output_type="np",
    ).images  # float NHWC in [0, 1]
    assert np.abs(ours.astype(float) - np.round(theirs * 255)).max() <= 1
    assert ours.std() > 10  # not a saturated image, so the comparison means something


def test_euler_integrates_the_velocity_field(flow_dir):
    model, _, _ = load_model(flow_dir)
    ours = generate(flow_dir, num_samples=3, steps=3, seed=2, device="cpu", progress=False)
    x = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for t in (0.0, 1 / 3, 2 / 3):  # x <- x + dt * v(x, t), network time t * 1000
            x = x + (1 / 3) * model(x, torch.tensor(t * 1000)).sample
    expected = ((x.clamp(-1, 1) + 1) * 127.5).round().numpy().transpose(0, 2, 3, 1)
    assert np.abs(ours.astype(float) - expected).max() <= 1
    assert ours.std() > 10


def test_generate_rejects_bad_arguments(model_dir, tmp_path):
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        generate(model_dir, num_samples=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        generate(model_dir, num_samples=2, steps=0)
    with pytest.raises(DataError, match="not a trained model folder"):
        generate(tmp_path, num_samples=2)


def test_write_samples_writes_samples_and_grid(ddpm_dir, tmp_path):
    reason, samples, picture = write_outputs(ddpm_dir, tmp_path)
    expected = generate(ddpm_dir, seed=0, device="cpu", progress=False, **SAMPLE_ARGS)
    assert reason is None and np.array_equal(samples, expected)
    assert picture.size == (2 * (8 + 2) + 2, 2 * (8 + 2) + 2)


def test_failed_model_gives_empty_samples_and_a_failed_grid(tmp_path, caplog):
    model_dir = tmp_path / "model"
    write_failed_model(model_dir, reason="training diverged at step 5", cfg=TINY, seed=0, step=5)
    with pytest.raises(DataError, match="failed: training diverged at step 5"):
        generate(model_dir, num_samples=2)
    reason, samples, picture = write_outputs(model_dir, tmp_path)
    assert reason == "training failed: training diverged at step 5"
    assert samples.shape == (0, 8, 8, 1) and samples.dtype == np.uint8
    assert_failed_grid(picture, channels=1)
    assert any(r.levelname == "ERROR" and reason in r.getMessage() for r in caplog.records)


def test_non_finite_samples_raise_and_give_empty_samples(tmp_path_factory, tmp_path):
    model_dir = write_model(tmp_path_factory, "ddpm", channels=3, nan=True)
    with pytest.raises(SamplingFailed, match=f"sampling from {model_dir} gave non-finite values"):
        generate(model_dir, device="cpu", progress=False, **SAMPLE_ARGS)
    reason, samples, picture = write_outputs(model_dir, tmp_path)
    assert "non-finite" in reason and samples.shape == (0, 8, 8, 3)
    assert_failed_grid(picture, channels=3)


@pytest.mark.parametrize("channels", [1, 3])
def test_save_grid_lays_out_images_row_by_row(tmp_path, channels):
    images = np.stack([np.full((4, 5, channels), 10 * (i + 1), np.uint8) for i in range(5)])
    save_grid(images, tmp_path / "grid.png", nrow=2)
    picture = Image.open(tmp_path / "grid.png")
    assert picture.mode == ("L" if channels == 1 else "RGB")
    grid = np.asarray(picture).reshape(picture.height, picture.width, channels)
    assert grid.shape[:2] == (3 * (4 + 2) + 2, 2 * (5 + 2) + 2)  # 3 rows x 2 columns, 2 px gaps
    for i in range(5):
        top, left = 2 + (i // 2) * 6, 2 + (i % 2) * 7
        assert (grid[top : top + 4, left : left + 5] == 10 * (i + 1)).all()
    assert (grid[:2] == 0).all() and (grid[14:, 9:] == 0).all()  # gaps and the empty 6th cell
    first = (tmp_path / "grid.png").read_bytes()
    save_grid(images, tmp_path / "grid.png", nrow=2)
    assert (tmp_path / "grid.png").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_save_grid_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8 images"):
        save_grid(np.zeros((2, 4, 4, 1), np.float32), tmp_path / "g.png")
    with pytest.raises(ValueError, match="nrow=0"):
        save_grid(np.zeros((2, 4, 4, 1), np.uint8), tmp_path / "g.png", nrow=0)


# A two-block DiT with flow matching, as the paper samples it (Euler).
DIT = {
    **{k: v for k, v in TINY.items() if k not in ("block_channels", "layers_per_block")},
    "model": "dit",
    "objective": "flow",
    "dit_size": "custom",
    "dit": {"depth": 2, "width": 32, "heads": 2, "patch": 2},
}
CPU = {"device": "cpu", "progress": False}


def write_dit(path, *, conditional, channels=1, size=8, latent=None, nan=False):
    """A DiT folder with random weights everywhere (the paper's zero initialisation would make
    every prediction 0), large label embeddings so that labels matter; 3 classes when
    conditional."""
    cfg = {**DIT, "conditional": conditional}
    torch.manual_seed(0)
    model = build_model(
        cfg, in_channels=channels, sample_size=size, num_classes=3 if conditional else 0
    )
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)
        for block in model.transformer_blocks:
            block.norm1.emb.class_embedder.embedding_table.weight.normal_(0, 2)
        if nan:
            model.proj_out_2.bias.fill_(float("nan"))
    save_model(model, build_scheduler(cfg), path, cfg=cfg, summary={"latent": latent})
    return path


@pytest.fixture(scope="module")
def conditional_dir(tmp_path_factory):
    return write_dit(tmp_path_factory.mktemp("cond") / "model", conditional=True)


def draws(num_samples, shape, seed):
    """generate's draws: the initial noise, then the class labels, from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_samples, *shape), generator=generator)
    return noise, torch.randint(0, 3, (num_samples,), generator=generator)


def velocity(model, x, t, labels):
    return model(x, torch.full((len(x),), t * 1000), class_labels=labels).sample


def test_guidance_scale_one_is_the_plain_conditional_sample(conditional_dir):
    ours = generate(conditional_dir, num_samples=3, steps=2, seed=2, **CPU)
    model, _, _ = load_model(conditional_dir)
    x, labels = draws(3, (1, 8, 8), seed=2)
    with torch.no_grad():
        for t in (0.0, 0.5):
            x = x + 0.5 * velocity(model, x, t, labels)
    assert np.abs(ours.astype(int) - to_uint8(x)).max() <= 1
    assert ours.shape == (3, 8, 8, 1) and ours.std() > 10
    given = generate(conditional_dir, num_samples=3, steps=2, seed=2, class_labels=labels, **CPU)
    assert np.array_equal(given, ours)
    other = (labels.numpy() + 1) % 3
    assert not np.array_equal(
        generate(conditional_dir, num_samples=3, steps=2, seed=2, class_labels=other, **CPU), ours
    )


def test_guidance_matches_one_euler_step_by_hand(conditional_dir):
    ours = generate(conditional_dir, num_samples=3, steps=1, seed=4, guidance_scale=4.0, **CPU)
    model, _, _ = load_model(conditional_dir)
    x, labels = draws(3, (1, 8, 8), seed=4)
    with torch.no_grad():
        cond = velocity(model, x, 0.0, labels)
        uncond = velocity(model, x, 0.0, torch.full((3,), 3))  # 3: the null label
    expected = to_uint8(x + 1.0 * (uncond + 4.0 * (cond - uncond)))
    assert np.abs(ours.astype(int) - expected).max() <= 1
    plain = generate(conditional_dir, num_samples=3, steps=1, seed=4, **CPU)
    assert np.abs(ours.astype(int) - plain).max() > 10  # guidance changed the samples


def test_write_samples_passes_the_guidance_scale(conditional_dir, tmp_path):
    out = {"samples_path": tmp_path / "samples.npy", "grid_path": tmp_path / "grid.png"}
    cfg = {**SAMPLE, "guidance_scale": 2.0}
    assert write_samples(conditional_dir, cfg=cfg, seed=0, device="cpu", **out) is None
    expected = generate(conditional_dir, seed=0, guidance_scale=2.0, **CPU, **SAMPLE_ARGS)
    assert np.array_equal(np.load(out["samples_path"]), expected)


def test_unconditional_models_take_no_labels_or_guidance(flow_dir, tmp_path):
    dit_dir = write_dit(tmp_path / "dit", conditional=False)
    model, _, _ = load_model(dit_dir)
    ours = generate(dit_dir, num_samples=2, steps=1, seed=0, **CPU)
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = to_uint8(x + velocity(model, x, 0.0, torch.zeros(2, dtype=torch.int64)))
    assert np.abs(ours.astype(int) - expected).max() <= 1  # always the null label, 0
    for model_dir in (dit_dir, flow_dir):
        with pytest.raises(ConfigError, match="need a conditional model"):
            generate(model_dir, num_samples=2, guidance_scale=4.0, **CPU)
        with pytest.raises(ConfigError, match="need a conditional model"):
            generate(model_dir, num_samples=2, class_labels=np.zeros(2, np.int64), **CPU)


def test_bad_class_labels_raise(conditional_dir):
    with pytest.raises(ValueError, match=r"class_labels must be 2 labels in \[0, 3\)"):
        generate(conditional_dir, num_samples=2, class_labels=np.array([0, 3]), **CPU)


@pytest.fixture
def autoencoder_dir(tmp_path, monkeypatch):
    """A tiny random AutoencoderKL folder: 4 latent channels, RGB, downsampling factor 2.

    Sampling decodes with diffprune.autoencoder's load_autoencoder and decode_to_uint8; where
    that module is not in this checkout, a stand-in with the same two functions takes its place.
    """
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=8,
    )  # fmt: skip
    autoencoder.save_pretrained(tmp_path / "autoencoder")
    try:
        import diffprune.autoencoder  # noqa: F401
    except ModuleNotFoundError:
        monkeypatch.setitem(sys.modules, "diffprune.autoencoder", _autoencoder_stand_in())
    return tmp_path / "autoencoder"


def _autoencoder_stand_in() -> types.ModuleType:
    module = types.ModuleType("diffprune.autoencoder")

    def load_autoencoder(source):
        return AutoencoderKL.from_pretrained(source).eval()

    @torch.no_grad()
    def decode_to_uint8(autoencoder, latents, *, batch_size, device):
        autoencoder.to(device)
        parts = [autoencoder.decode(z.to(device)).sample.cpu() for z in latents.split(batch_size)]
        return to_uint8(torch.cat(parts))

    module.load_autoencoder, module.decode_to_uint8 = load_autoencoder, decode_to_uint8
    return module


def test_latent_model_decodes_through_its_autoencoder(autoencoder_dir, tmp_path):
    latent = {"autoencoder": str(autoencoder_dir), "scale_factor": 0.5}
    model_dir = write_dit(tmp_path / "m", conditional=False, channels=4, size=4, latent=latent)
    ours = generate(model_dir, num_samples=3, steps=1, batch_size=2, seed=1, **CPU)
    assert ours.shape == (3, 8, 8, 3) and ours.dtype == np.uint8  # 4 latent pixels x factor 2
    model, _, _ = load_model(model_dir)
    x = torch.randn((3, 4, 4, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = x + velocity(model, x, 0.0, torch.zeros(3, dtype=torch.int64))
        decoded = AutoencoderKL.from_pretrained(autoencoder_dir).decode(z / 0.5).sample
    assert np.abs(ours.astype(int) - to_uint8(decoded)).max() <= 1
    assert len(np.unique(ours.reshape(3, -1), axis=0)) == 3


def test_non_finite_latents_fail_before_decoding(autoencoder_dir, tmp_path):
    latent = {"autoencoder": str(autoencoder_dir), "scale_factor": 0.5}
    model_dir = write_dit(
        tmp_path / "m", conditional=False, channels=4, size=4, latent=latent, nan=True
    )
    reason, samples, picture = write_outputs(model_dir, tmp_path)
    assert "non-finite" in reason and samples.shape == (0, 8, 8, 3)  # the decoded images' shape
    assert_failed_grid(picture, channels=3)
