"""Named feature extractors for Fréchet distances, KID and precision/recall.

Each extractor maps a uint8 NHWC batch (gray or RGB) to float64 (B, D) features:

- "classifier": penultimate activations of the pipeline's own CNN (`diffprune.classifier`),
  trained on the labelled training store;
- "efficientnet-lite0": pooled ImageNet EfficientNet-Lite0 features (`diffprune.embed`), images
  resized to `image_size`;
- "inception": clean-fid's Inception-v3 (its TorchScript port of the TensorFlow FID network) with
  clean-fid's "clean" preprocessing (PIL bicubic resize to 299x299 in float). Offline, only when
  the weights file is present; this module never downloads it.

Numbers from different extractors are not comparable: tables name the extractor through
`FEATURE_LABELS`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffprune import classifier
from diffprune.data import at_resolution
from diffprune.device import resolve_device
from diffprune.embed import embedder_info, load_embedder
from diffprune.errors import DataError

log = logging.getLogger(__name__)

FEATURES = ("classifier", "efficientnet-lite0", "inception")
FEATURE_LABELS = {
    "classifier": "FD (CNN classifier trained on the labelled training images)",
    "efficientnet-lite0": "FD (EfficientNet-Lite0, ImageNet)",
    "inception": "FID (Inception-v3, clean-fid)",
}

INCEPTION_FILE = "inception-2015-12-05.pt"
#: Where clean-fid itself looks for (and would download) the weights in its "clean" mode.
CLEANFID_INCEPTION_PATH = Path("/tmp") / INCEPTION_FILE
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
)


@dataclass
class FeatureExtractor:
    """A callable uint8 NHWC batch -> float64 (B, dim); `info` goes into metrics sidecars."""

    name: str
    dim: int
    fn: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    info: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return FEATURE_LABELS[self.name]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(_check_batch(batch)), dtype=np.float64)


def load_feature_extractor(
    name: str,
    *,
    resolution: int | None = None,
    classifier_path: str | os.PathLike | None = None,
    image_size: int = 64,
    inception_weights: str | os.PathLike | None = None,
    device: str = "auto",
) -> FeatureExtractor:
    """Build extractor `name`.

    `resolution` is the classifier's input size (default: the one it was trained at; other
    extractors ignore it), `image_size` EfficientNet-Lite0's. `inception_weights` is clean-fid's
    `inception-2015-12-05.pt` or a folder holding it (default: clean-fid's own /tmp location).
    """
    if name == "classifier":
        return _classifier_extractor(classifier_path, resolution, device)
    if name == "efficientnet-lite0":
        return _efficientnet_extractor(image_size, device)
    if name == "inception":
        return _inception_extractor(inception_weights, device)
    raise ValueError(f"unknown feature extractor {name!r}; allowed: {', '.join(FEATURES)}")


def extract(
    extractor: Callable[[np.ndarray], np.ndarray],
    images_uint8_nhwc: np.ndarray,
    *,
    batch_size: int = 256,
    resolution: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Features of all images in order, float64 (N, D). Reads `batch_size` images at a time, so
    a memory-mapped store is never held whole; with `resolution`, each batch is first resized
    exactly as training sees it (`diffprune.data.at_resolution`)."""
    _check_batch(images_uint8_nhwc)
    if len(images_uint8_nhwc) == 0:
        raise DataError("no images to extract features from")
    name = getattr(extractor, "name", "features")

    def batch(start: int) -> np.ndarray:
        rows = np.asarray(images_uint8_nhwc[start : start + batch_size])
        return rows if resolution is None else at_resolution(rows, resolution)

    chunks = [
        np.asarray(extractor(batch(start)))
        for start in tqdm(
            range(0, len(images_uint8_nhwc), batch_size), desc=name, disable=not progress
        )
    ]
    return np.concatenate(chunks).astype(np.float64, copy=False)


def _classifier_extractor(
    classifier_path: str | os.PathLike | None, resolution: int | None, device: str
) -> FeatureExtractor:
    if classifier_path is None:
        raise ValueError("feature extractor 'classifier' needs classifier_path (the trained CNN)")
    model = classifier.load_classifier(classifier_path, device=device)
    resolution = model.config["resolution"] if resolution is None else resolution

    def fn(batch: np.ndarray) -> np.ndarray:
        return classifier.features(model, batch, resolution=resolution, batch_size=len(batch))

    info = {"model": "SmallCNN", "path": str(classifier_path), **model.config}
    return FeatureExtractor("classifier", model.config["feature_dim"], fn, info)


def _efficientnet_extractor(image_size: int, device: str) -> FeatureExtractor:
    embedder = load_embedder("efficientnet-lite0", image_size=image_size, device=device)
    return FeatureExtractor("efficientnet-lite0", embedder.dim, embedder, embedder_info(embedder))


def _inception_extractor(weights: str | os.PathLike | None, device: str) -> FeatureExtractor:
    path = Path(weights) if weights is not None else CLEANFID_INCEPTION_PATH
    if path.is_dir():
        path = path / INCEPTION_FILE
    if path.name != INCEPTION_FILE or not path.is_file():
        raise DataError(
            f"Inception-v3 weights not found at {str(path)!r}: download {INCEPTION_URL} on a "
            f"machine with network and set evaluate.inception_weights to that file "
            f"(named {INCEPTION_FILE}) or to its folder"
        )
    # clean-fid (and the torchvision it imports) only here: most studies have no Inception
    # weights, and the import costs every evaluation and reference job about a second.
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    torch_device = resolve_device(device)
    # download=False: clean-fid only joins the folder with its fixed file name and loads it.
    model = InceptionV3W(str(path.parent), download=False, resize_inside=False)
    model = model.to(torch_device).eval()
    resize = build_resizer("clean")

    def fn(batch: np.ndarray) -> np.ndarray:
        rgb = np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch
        # clean-fid's clean mode: per-channel PIL bicubic in float32, values stay in [0, 255].
        resized = np.stack([resize(image) for image in rgb]).transpose(0, 3, 1, 2)
        with torch.no_grad():
            return model(torch.from_numpy(resized).to(torch_device)).cpu().numpy()

    info = {"model": "inception-v3 (clean-fid torchscript)", "path": str(path), "mode": "clean"}
    return FeatureExtractor("inception", 2048, fn, info)


def _check_batch(images: np.ndarray) -> np.ndarray:
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise DataError(
            f"images are {images.dtype} with shape {images.shape}; "
            "expected uint8 (N,H,W,C) with C = 1 or 3"
        )
    return images
