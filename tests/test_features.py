import numpy as np
import pytest
import torch
from cleanfid.resize import build_resizer
from torch import nn

from diffprune import classifier
from diffprune.data import at_resolution
from diffprune.embed import load_embedder
from diffprune.errors import DataError
from diffprune.features import (
    FEATURE_LABELS,
    FEATURES,
    INCEPTION_FILE,
    extract,
    load_feature_extractor,
)


def images(n: int, *, seed: int, size: int = 16, channels: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_every_extractor_has_a_table_label():
    assert set(FEATURE_LABELS) == set(FEATURES)
    assert FEATURE_LABELS["inception"].startswith("FID")
    with pytest.raises(ValueError, match="unknown feature extractor 'clip'"):
        load_feature_extractor("clip", resolution=16)


def test_classifier_features_come_from_the_saved_cnn(tmp_path):
    train = images(64, seed=0)
    labels = np.arange(64) % 2
    model = classifier.train_classifier(
        train, labels, num_classes=2, resolution=16, epochs=1, device="cpu", progress=False
    )
    path = tmp_path / "model.pt"
    classifier.save_classifier(model, path, meta={})
    extractor = load_feature_extractor("classifier", resolution=16, classifier_path=path)
    assert extractor.dim == 128 and extractor.label == FEATURE_LABELS["classifier"]
    batch = images(20, seed=1)
    feats = extract(extractor, batch, batch_size=8, progress=False)
    assert feats.shape == (20, 128) and feats.dtype == np.float64
    np.testing.assert_allclose(feats, classifier.features(model, batch), atol=1e-6)
    with pytest.raises(ValueError, match="needs classifier_path"):
        load_feature_extractor("classifier", resolution=16)


def test_efficientnet_features_match_the_embedder():
    extractor = load_feature_extractor("efficientnet-lite0", image_size=32, device="cpu")
    batch = images(6, seed=2)
    feats = extract(extractor, batch, batch_size=4, progress=False)
    assert feats.shape == (6, 1280) and feats.dtype == np.float64
    assert extractor.info["image_size"] == 32
    embedder = load_embedder("efficientnet-lite0", image_size=32, device="cpu")
    np.testing.assert_allclose(feats, embedder(batch), rtol=1e-5, atol=1e-5)
    # gray images and their RGB copies are the same input for this extractor
    np.testing.assert_allclose(extractor(np.repeat(batch, 3, axis=-1)), feats, atol=1e-5)
    assert not np.allclose(feats[0], feats[1])


class _FakeInception(nn.Module):
    """Random-weight stand-in with the attribute clean-fid's wrapper uses (`layers`)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2048))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_inception_loads_local_weights_through_cleanfid(tmp_path):
    torch.manual_seed(0)
    fake = _FakeInception()
    torch.jit.script(fake).save(str(tmp_path / INCEPTION_FILE))
    extractor = load_feature_extractor("inception", inception_weights=tmp_path, device="cpu")
    gray = images(3, seed=3)
    feats = extract(extractor, gray, progress=False)
    assert feats.shape == (3, 2048) and feats.dtype == np.float64
    # clean mode: gray -> RGB, PIL bicubic to 299x299 in float, then (x - 128) / 128
    resize = build_resizer("clean")
    expected = np.stack([resize(np.repeat(im, 3, axis=-1)) for im in gray]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        expected = fake((torch.from_numpy(expected) - 128) / 128).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)
    # the file path works as well as its folder
    by_file = load_feature_extractor("inception", inception_weights=tmp_path / INCEPTION_FILE)
    np.testing.assert_allclose(by_file(gray), feats, rtol=1e-5)


def test_missing_inception_weights_say_how_to_provide_them(tmp_path):
    with pytest.raises(DataError, match=r"inception-2015-12-05\.pt.*inception_weights"):
        load_feature_extractor("inception", inception_weights=tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_feature_extractor("inception", inception_weights=tmp_path / "weights.pt")


def test_extract_refuses_bad_images():
    extractor = load_feature_extractor("efficientnet-lite0", image_size=32, device="cpu")
    with pytest.raises(DataError, match="uint8"):
        extract(extractor, images(2, seed=4).astype(np.float32), progress=False)
    with pytest.raises(DataError, match="no images"):
        extract(extractor, images(0, seed=4), progress=False)


def test_extract_at_a_resolution_resizes_batch_by_batch_as_the_whole_array_would(tmp_path):
    """The reference rule reads the memory-mapped store a batch at a time: the same features as
    resizing the whole store first (what it did before), without holding it."""
    path = tmp_path / "images.npy"
    np.save(path, images(10, seed=5))
    store = np.load(path, mmap_mode="r")
    extractor = load_feature_extractor("efficientnet-lite0", image_size=32, device="cpu")
    whole = extract(extractor, at_resolution(store, 14), batch_size=4, progress=False)
    batched = extract(extractor, store, batch_size=4, resolution=14, progress=False)
    np.testing.assert_array_equal(batched, whole)
