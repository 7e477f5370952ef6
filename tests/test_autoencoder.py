import json
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from diffprune import autoencoder_train as ae_train
from diffprune import checkpoints
from diffprune.autoencoder import (
    INFO,
    build_autoencoder,
    decode,
    decode_to_uint8,
    encode,
    encode_to_file,
    load_autoencoder,
    load_latents,
    reconstruction_error,
    write_latents,
)
from diffprune.autoencoder_train import prepare_autoencoder, train_autoencoder
from diffprune.errors import ConfigError, DataError, TrainingDiverged
from tests.script_helpers import locked_elsewhere

TINY = {
    "source": "train",
    "block_channels": [8, 16],
    "latent_channels": 2,
    "layers_per_block": 1,
    "steps": 40,
    "batch_size": 8,
    "lr": 3e-3,
    "device": "cpu",
    "encode_batch_size": 16,
}
RESOLUTION = 16
WEIGHTS = "diffusion_pytorch_model.safetensors"


def images(n=40, seed=0, size=16, channels=1):
    """Smooth random images (blocky 4x4 patterns blurred up), which an autoencoder can learn."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, channels, 4, 4), dtype=np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return (fine.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def train(tmp_path, name, **kwargs):
    kwargs = {"cfg": TINY, "resolution": RESOLUTION, "seed": 0, "progress": False, **kwargs}
    return train_autoencoder(images(), out_dir=tmp_path / name, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ae")
    return root / "a", train(root, "a")


def tiny_model(seed=0, in_channels=1):
    torch.manual_seed(seed)
    return build_autoencoder(TINY, in_channels=in_channels).eval()


# --------------------------------------------------------------------------- train
def test_training_lowers_the_held_out_reconstruction_error(trained):
    _, summary = trained
    held_out = images()[-2:]  # 5% of 40
    assert summary["reconstruction"]["n_images"] == 2
    untrained = reconstruction_error(tiny_model(), held_out, resolution=RESOLUTION)
    assert summary["reconstruction"]["mse"] < 0.5 * untrained["mse"]
    assert summary["reconstruction"]["psnr"] > untrained["psnr"]


def test_the_record_has_every_key(trained):
    folder, summary = trained
    record = json.loads((folder / INFO).read_text())
    assert record == json.loads(json.dumps(summary))
    for key in (
        "cfg", "seed", "source", "resolution", "latent_shape", "downsampling_factor",
        "scale_factor", "reconstruction", "wall_seconds", "code_version", "image_channels",
    ):  # fmt: skip
        assert key in record, key
    assert record["source"] == "train"
    assert record["latent_shape"] == [2, 8, 8]
    assert record["downsampling_factor"] == 2
    assert set(record["reconstruction"]) == {"mse", "psnr", "n_images"}
    assert record["cfg"]["kl_weight"] == 1e-6  # defaults are written out


def test_the_folder_loads_like_a_hub_id_with_the_same_weights(trained):
    folder, summary = trained
    ae = load_autoencoder(folder)
    assert isinstance(ae, AutoencoderKL) and not ae.training
    assert ae.config.scaling_factor == pytest.approx(summary["scale_factor"])
    # the same numbers as the in-memory model that wrote the record
    quality = reconstruction_error(ae, images()[-2:], resolution=RESOLUTION)
    assert quality["mse"] == pytest.approx(summary["reconstruction"]["mse"], rel=1e-6)
    again = load_autoencoder(folder)
    x = images()[:4]
    assert np.array_equal(encode(ae, x, resolution=RESOLUTION, progress=False),
                          encode(again, x, resolution=RESOLUTION, progress=False))  # fmt: skip


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, trained):
    folder, _ = trained
    train(tmp_path, "again")
    train(tmp_path, "other", seed=1)
    assert (tmp_path / "again" / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()
    a, b = load_file(folder / WEIGHTS), load_file(tmp_path / "other" / WEIGHTS)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_a_longer_run_resumes_a_checkpoint_exactly(tmp_path, monkeypatch, trained):
    folder, _ = trained
    ckpt = tmp_path / "ckpt"

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as patch:  # fails after the loop: the last checkpoint stays
        patch.setattr(ae_train, "measure_scale_factor", boom)
        with pytest.raises(RuntimeError):
            train(tmp_path, "short", cfg={**TINY, "steps": 25}, checkpoint_dir=ckpt)
    assert not (tmp_path / "short").exists()
    summary = train(tmp_path, "resumed", checkpoint_dir=ckpt, checkpoint_every=10)
    assert summary["resumed_from_step"] == 25
    assert (tmp_path / "resumed" / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()
    assert not (ckpt / checkpoints.LATEST).exists()


def test_a_second_autoencoder_training_of_the_run_is_refused_while_one_runs(tmp_path):
    """The autoencoder takes the run lock of its checkpoint folder, as the diffusion training."""
    ckpt = tmp_path / "ckpt"
    with (
        locked_elsewhere(ckpt) as holder,
        pytest.raises(checkpoints.RunLocked, match=f"pid {holder}.*is training"),
    ):
        train(tmp_path, "a", cfg={**TINY, "steps": 2}, checkpoint_dir=ckpt)
    assert not (tmp_path / "a").exists()
    train(tmp_path, "a", cfg={**TINY, "steps": 2}, checkpoint_dir=ckpt)  # the lock went with it
    assert (tmp_path / "a" / WEIGHTS).is_file() and not ckpt.exists()


def test_a_stopped_run_keeps_two_checkpoints_and_resumes_to_the_same_bytes(
    tmp_path, monkeypatch, trained
):
    """Stopped at step 25 of 40 (checkpoints every 10): latest.pt (step 20) and previous.pt
    (step 10) stay; the rerun resumes at 20 and ends with the uninterrupted run's weights."""
    folder, _ = trained
    ckpt, real_loss, calls = tmp_path / "ckpt", ae_train._loss, []

    def stop_at_25(*args, **kwargs):
        calls.append(1)
        if len(calls) == 25:
            raise RuntimeError("stopped")
        return real_loss(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ae_train, "_loss", stop_at_25)
        with pytest.raises(RuntimeError, match="stopped"):
            train(tmp_path, "b", checkpoint_dir=ckpt, checkpoint_every=10)
    steps = {name: torch.load(ckpt / name, weights_only=True)["step"] for name in
             (checkpoints.LATEST, checkpoints.PREVIOUS)}  # fmt: skip
    assert steps == {checkpoints.LATEST: 20, checkpoints.PREVIOUS: 10}
    summary = train(tmp_path, "b", checkpoint_dir=ckpt, checkpoint_every=10)
    assert summary["resumed_from_step"] == 20
    assert (tmp_path / "b" / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()


def test_non_finite_weights_fail_the_autoencoder_and_are_never_written(tmp_path, monkeypatch):
    """The weight check runs at every checkpoint step, also without a checkpoint folder."""
    real_step = torch.optim.AdamW.step

    def poison(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poison)
    with pytest.raises(TrainingDiverged, match="autoencoder training diverged at step 2: non-f"):
        train(tmp_path, "c", cfg={**TINY, "steps": 3}, checkpoint_every=2)
    assert not (tmp_path / "c").exists()


def test_bad_resolution_and_config(tmp_path):
    with pytest.raises(ConfigError, match="resolution 15 must be divisible"):
        train(tmp_path, "x", resolution=15)
    with pytest.raises(ConfigError, match=r"autoencoder\.loss = 'huber'"):
        train(tmp_path, "x", cfg={**TINY, "loss": "huber"})


# --------------------------------------------------------------------------- pretrained
def test_pretrained_folder_is_copied_and_its_scale_measured(tmp_path):
    torch.manual_seed(0)
    rgb = AutoencoderKL(  # an RGB model like sd-vae-ft-ema, for gray images
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
    )
    rgb.save_pretrained(tmp_path / "hub" / "vae")
    cfg = {"source": "pretrained", "pretrained": str(tmp_path / "hub"), "subfolder": "vae"}
    data = images()
    summary = prepare_autoencoder(
        {**cfg, "device": "cpu"}, images=data, resolution=RESOLUTION, seed=0,
        out_dir=tmp_path / "ae", progress=False,
    )  # fmt: skip
    assert summary["source"] == str(tmp_path / "hub")
    assert summary["pretrained_scaling_factor"] == pytest.approx(0.18215)
    assert summary["latent_shape"] == [4, 8, 8]
    copy = load_autoencoder(tmp_path / "ae")
    latents = encode(copy, data, resolution=RESOLUTION, progress=False).astype(np.float64)
    assert (latents * summary["scale_factor"]).std() == pytest.approx(1.0, rel=1e-2)
    assert np.isfinite(summary["reconstruction"]["psnr"])
    gray = decode_to_uint8(copy, latents[:3], device="cpu", channels=1)
    assert gray.shape == (3, RESOLUTION, RESOLUTION, 1) and gray.dtype == np.uint8


def test_a_missing_pretrained_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-vae"
    cfg = {"source": "pretrained", "pretrained": str(missing)}
    with pytest.raises(
        DataError, match=rf"cannot load autoencoder {re.escape(repr(str(missing)))}.*local folder"
    ):
        prepare_autoencoder(cfg, images=images(), resolution=16, seed=0, out_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"autoencoder\.pretrained = null"):
        prepare_autoencoder(
            {"source": "pretrained"}, images=images(), resolution=16, seed=0, out_dir=tmp_path
        )


# --------------------------------------------------------------------------- encode and decode
def test_encode_shape_order_and_batch_size():
    ae, data = tiny_model(), images(n=20)
    latents = encode(ae, data, resolution=RESOLUTION, batch_size=7, progress=False)
    assert latents.dtype == np.float16 and latents.shape == (20, 2, 8, 8)
    order = np.random.default_rng(0).permutation(20)
    permuted = encode(ae, data[order], resolution=RESOLUTION, batch_size=20, progress=False)
    np.testing.assert_allclose(permuted, latents[order], rtol=1e-3, atol=1e-3)


def test_encode_to_file_matches_and_leaves_no_temporary_file(tmp_path):
    ae, data = tiny_model(), images(n=10)
    expected = encode(ae, data, resolution=RESOLUTION, batch_size=4, progress=False)
    out = tmp_path / "latents" / "latents.npy"
    shape = encode_to_file(ae, data, out, resolution=RESOLUTION, batch_size=4, progress=False)
    assert shape == expected.shape
    assert np.array_equal(np.load(out), expected)
    assert [p.name for p in out.parent.iterdir()] == ["latents.npy"]


def test_encode_reads_a_memory_map_through_workers_to_the_same_bytes(tmp_path):
    ae, data = tiny_model(), images(n=30, size=20)  # resized to 16 px, in the workers
    np.save(tmp_path / "images.npy", data)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    kwargs = {"resolution": RESOLUTION, "batch_size": 8, "progress": False}
    expected = encode(ae, data, **kwargs)
    assert encode(ae, mapped, num_workers=2, **kwargs).tobytes() == expected.tobytes()


def test_decode_gives_images_in_range():
    ae, data = tiny_model(), images(n=5)
    latents = encode(ae, data, resolution=RESOLUTION, progress=False)
    x = decode(ae, torch.from_numpy(latents))
    assert x.shape == (5, 1, RESOLUTION, RESOLUTION)
    assert x.min() >= -1 and x.max() <= 1
    u = decode_to_uint8(ae, latents, batch_size=2, device="cpu")
    assert u.shape == (5, RESOLUTION, RESOLUTION, 1) and u.dtype == np.uint8


def test_write_latents_records_the_scale_factor(tmp_path, trained):
    folder, summary = trained
    data = images()
    np.save(tmp_path / "images.npy", data)
    out, meta_path = tmp_path / "latents.npy", tmp_path / "latents.json"
    write_latents(
        folder, data, resolution=RESOLUTION, out_path=out, meta_path=meta_path,
        device="cpu", num_workers=1, images_file=tmp_path / "images.npy", progress=False,
    )  # fmt: skip
    latents, meta = load_latents(out, meta_path)
    assert meta["scale_factor"] == summary["scale_factor"] and meta["num_workers"] == 1
    assert meta["shape"] == [40, 2, 8, 8] and meta["dtype"] == "float16"
    assert meta["images_sha256"] and meta["autoencoder_sha256"]
    assert (latents.astype(np.float64) * meta["scale_factor"]).std() == pytest.approx(1, rel=1e-2)
    with pytest.raises(ConfigError, match="resolution 8 differs"):
        write_latents(folder, data, resolution=8, out_path=out, meta_path=meta_path)
