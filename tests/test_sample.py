import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from PIL import Image

from diffprune.diffusion import build_model, build_scheduler
from diffprune.errors import DataError, SamplingFailed
from diffprune.sample import generate, save_grid, write_samples
from diffprune.status import write_failed_model
from diffprune.train import load_model, save_model

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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
