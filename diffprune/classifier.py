"""A small CNN classifier trained on the labelled image store.

It serves two jobs in the evaluation: its penultimate activations are the "classifier" feature
space for Fréchet distances (the usual choice for MNIST-like data, where ImageNet networks see
little of interest), and its predictions give the class shares of generated samples.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from diffprune.data import to_model_input
from diffprune.device import resolve_device
from diffprune.errors import DataError
from diffprune.io import atomic_path

log = logging.getLogger(__name__)

FEATURE_DIM = 128


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks, a `feature_dim` penultimate layer and a linear head.

    `config` holds every constructor argument, so a checkpoint rebuilds the exact model.
    """

    def __init__(
        self,
        *,
        channels: int,
        num_classes: int,
        resolution: int,
        feature_dim: int = FEATURE_DIM,
        width: int = 32,
    ) -> None:
        super().__init__()
        self.config = {
            "channels": channels,
            "num_classes": num_classes,
            "resolution": resolution,
            "feature_dim": feature_dim,
            "width": width,
        }
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            # Pooling to a fixed 4x4 grid keeps the head the same size at any resolution >= 4.
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (the input of the linear head), shape (B, feature_dim)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    *,
    num_classes: int,
    resolution: int,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> SmallCNN:
    """Train a SmallCNN with Adam on uint8 NHWC images (a memory map is fine: each batch's rows
    are read when it is used); returns it in eval mode on `device`."""
    images = _check_images(train_images)
    labels = np.asarray(train_labels)
    if labels.shape != (len(images),):
        raise ValueError(
            f"train_labels has shape {labels.shape}; expected ({len(images)},), one per image"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}; a classifier needs at least 2")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels span {labels.min()}..{labels.max()}; allowed 0..{num_classes - 1} "
            "(unlabelled stores, label -1, cannot train a classifier)"
        )
    torch_device = resolve_device(device)
    torch.manual_seed(seed)
    model = SmallCNN(channels=images.shape[-1], num_classes=num_classes, resolution=resolution)
    model.to(torch_device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # The loader shuffles row ids only; each batch's images are read from `images` (a memory map
    # is fine), so the training set is never held whole.
    loader = torch.utils.data.DataLoader(
        torch.arange(len(images)),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    targets = torch.from_numpy(labels.astype(np.int64))
    model.train()
    bar = tqdm(total=epochs * len(loader), desc="classifier", disable=not progress)
    for epoch in range(epochs):
        total_loss, correct, seen = 0.0, 0, 0
        for rows in loader:
            x = to_model_input(images[rows.numpy()], resolution).to(torch_device)
            target = targets[rows].to(torch_device)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(target)
            correct += (logits.argmax(1) == target).sum().item()
            seen += len(target)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        log.info(
            "classifier epoch %d/%d: loss %.4f, train accuracy %.4f",
            epoch + 1,
            epochs,
            total_loss / seen,
            correct / seen,
        )
    bar.close()
    return model.eval()


def save_classifier(model: SmallCNN, path: str | os.PathLike, *, meta: dict) -> None:
    """Write {state_dict, config, meta} atomically; `meta` must hold only plain JSON-like values."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, "config": dict(model.config), "meta": meta}, tmp)


def load_classifier(path: str | os.PathLike, device: str = "auto") -> SmallCNN:
    """Rebuild the model from the checkpoint's config; `model.meta` holds the saved meta."""
    if not os.path.exists(path):
        raise DataError(f"classifier checkpoint {str(path)!r} does not exist; train it first")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = SmallCNN(**checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    model.meta = checkpoint["meta"]
    return model.to(resolve_device(device)).eval()


def features(
    model: SmallCNN,
    images: np.ndarray,
    *,
    resolution: int | None = None,
    batch_size: int = 512,
    progress: bool = False,
) -> np.ndarray:
    """Penultimate activations, float32 (N, feature_dim): the "classifier" FD feature space."""
    return _run(model, images, model.features, resolution, batch_size, progress)


def predict(
    model: SmallCNN,
    images: np.ndarray,
    *,
    resolution: int | None = None,
    batch_size: int = 512,
    progress: bool = False,
) -> np.ndarray:
    """Predicted class labels, int64 (N,)."""
    return _run(model, images, lambda x: model(x).argmax(1), resolution, batch_size, progress)


def classifier_accuracy(
    model: SmallCNN,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    resolution: int | None = None,
    batch_size: int = 512,
) -> float:
    """Share of images whose predicted label equals `labels`.

    Unknown labels (-1) are refused: every prediction would count as wrong, a false 0.0.
    """
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"labels has shape {labels.shape}; expected ({len(images)},)")
    if (labels < 0).any():
        raise DataError(
            f"{int((labels < 0).sum())} of the {len(labels)} held-out images have no label (-1): "
            "the classifier's accuracy on them would be a false 0; allowed: held-out images "
            "labelled with the training classes"
        )
    predicted = predict(model, images, resolution=resolution, batch_size=batch_size)
    return float((predicted == labels).mean())


def _run(
    model: SmallCNN,
    images: np.ndarray,
    fn: Callable[[torch.Tensor], torch.Tensor],
    resolution: int | None,
    batch_size: int,
    progress: bool,
) -> np.ndarray:
    """Apply `fn` to batches of preprocessed images without gradients; concatenate on the CPU.

    `resolution` defaults to the one the model was trained at; any other value is refused,
    because the features would silently change meaning.
    """
    images = _check_images(images)
    config = model.config
    if resolution is not None and resolution != config["resolution"]:
        raise ValueError(
            f"resolution={resolution} but the classifier was trained at {config['resolution']}"
        )
    if images.shape[-1] != config["channels"]:
        raise DataError(
            f"images have {images.shape[-1]} channel(s); "
            f"the classifier expects {config['channels']}"
        )
    device = next(model.parameters()).device
    outputs = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="classify", disable=not progress):
            x = to_model_input(np.asarray(images[start : start + batch_size]), config["resolution"])
            outputs.append(fn(x.to(device)).cpu().numpy())
    return np.concatenate(outputs)


def _check_images(images: np.ndarray) -> np.ndarray:
    if (
        images.ndim != 4
        or images.shape[-1] not in (1, 3)
        or images.dtype != np.uint8
        or len(images) == 0
    ):
        raise DataError(
            f"images are {images.dtype} with shape {images.shape}; "
            "expected uint8 (N,H,W,C) with N >= 1 and C = 1 or 3"
        )
    return images
