import numpy as np
import pytest
import torch

from diffprune.classifier import (
    classifier_accuracy,
    features,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)
from diffprune.errors import DataError


def bars(n: int, *, seed: int, size: int = 16, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Three separable classes: a bright horizontal bar, a vertical bar, or a centre square,
    at random positions on a noisy background."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    images = rng.integers(0, 60, size=(n, size, size, channels)).astype(np.uint8)
    for image, label in zip(images, labels, strict=True):
        pos = rng.integers(2, size - 6)
        if label == 0:
            image[pos : pos + 3, :] = 230
        elif label == 1:
            image[:, pos : pos + 3] = 230
        else:
            image[size // 2 - 3 : size // 2 + 3, size // 2 - 3 : size // 2 + 3] = 230
    return images, labels.astype(np.int64)


@pytest.fixture(scope="module")
def trained():
    images, labels = bars(600, seed=0)
    model = train_classifier(
        images,
        labels,
        num_classes=3,
        resolution=16,
        epochs=3,
        batch_size=64,
        seed=0,
        device="cpu",
        progress=False,
    )
    return model


def test_learns_a_separable_task(trained):
    images, labels = bars(300, seed=1)
    assert classifier_accuracy(trained, images, labels, resolution=16) >= 0.95
    # an untrained network of the same shape is near chance: the accuracy comes from training
    untrained = train_classifier(
        images[:1],
        labels[:1],
        num_classes=3,
        resolution=16,
        epochs=0,
        device="cpu",
        progress=False,
    )
    assert classifier_accuracy(untrained, images, labels) < 0.7


def test_features_are_the_penultimate_layer(trained):
    images, _ = bars(40, seed=2)
    feats = features(trained, images, resolution=16, batch_size=16)
    assert feats.shape == (40, 128) and feats.dtype == np.float32
    # the head applied to the features gives the predictions
    logits = trained.head(torch.from_numpy(feats))
    np.testing.assert_array_equal(logits.argmax(1).numpy(), predict(trained, images))
    # batching does not change the result
    np.testing.assert_allclose(feats, features(trained, images, batch_size=7), atol=1e-5)


def test_save_load_round_trip(trained, tmp_path):
    path = tmp_path / "cls" / "model.pt"
    save_classifier(trained, path, meta={"test_accuracy": 0.9, "class_names": ["a", "b", "c"]})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind
    loaded = load_classifier(path, device="cpu")
    assert (
        loaded.config
        == trained.config
        == {
            "channels": 1,
            "num_classes": 3,
            "resolution": 16,
            "feature_dim": 128,
            "width": 32,
        }
    )
    assert loaded.meta == {"test_accuracy": 0.9, "class_names": ["a", "b", "c"]}
    images, _ = bars(50, seed=3)
    np.testing.assert_array_equal(predict(loaded, images), predict(trained, images))
    np.testing.assert_array_equal(features(loaded, images), features(trained, images))


def test_training_is_seeded():
    images, labels = bars(128, seed=4, channels=3)
    kwargs = dict(num_classes=3, resolution=8, epochs=1, batch_size=32, device="cpu")
    a = train_classifier(images, labels, seed=5, progress=False, **kwargs)
    b = train_classifier(images, labels, seed=5, progress=False, **kwargs)
    c = train_classifier(images, labels, seed=6, progress=False, **kwargs)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)
    assert a.config["channels"] == 3 and predict(a, images).shape == (128,)


def test_bad_inputs_are_refused(trained):
    images, labels = bars(10, seed=5)
    with pytest.raises(ValueError, match="labels span"):
        train_classifier(images, labels - 1, num_classes=3, resolution=16, progress=False)
    with pytest.raises(DataError, match="channel"):
        predict(trained, np.repeat(images, 3, axis=-1))
    with pytest.raises(ValueError, match="trained at 16"):
        features(trained, images, resolution=28)
    with pytest.raises(DataError, match="uint8"):
        predict(trained, images.astype(np.float32))
    with pytest.raises(DataError, match="does not exist"):
        load_classifier("/nonexistent/model.pt")


def test_training_from_a_memory_map_reads_batches_and_learns_the_same_weights(tmp_path):
    """The classifier rule passes the memory-mapped store: each batch's rows are read when used,
    and the weights are those of training on the same images in memory."""
    images, labels = bars(96, seed=3)
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    common = dict(num_classes=3, resolution=16, epochs=2, batch_size=32, device="cpu")
    in_memory = train_classifier(images, labels, progress=False, **common)
    from_map = train_classifier(mapped, labels, progress=False, **common)
    for a, b in zip(in_memory.state_dict().values(), from_map.state_dict().values(), strict=True):
        assert torch.equal(a, b)
