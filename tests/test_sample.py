import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from PIL import Image

from diffprune.diffusion import build_model, build_scheduler
from diffprune.errors import DataError
from diffprune.sample import generate, save_grid
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


def write_model(tmp_path_factory, objective):
    """A random-weight model folder, written and later read by the same code as trained ones."""
    cfg = {**TINY, "objective": objective}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(objective) / "model"
    save_model(build_model(cfg, in_channels=1), build_scheduler(cfg), path, cfg=cfg)
    return path


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
