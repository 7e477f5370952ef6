"""Decode images of any source into uint8 arrays at the store's size (image folders, hub rows).

Resizing happens here once, at build time: the shorter side to `image_size`, then a centre crop.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from diffprune.errors import ConfigError

log = logging.getLogger(__name__)

# (images uint8 NHWC, labels int64, sources, class names or None, bad files as (source, reason))
LoadedImages = tuple[np.ndarray, np.ndarray, list[str], list[str] | None, list[tuple[str, str]]]


def check_channels(channels: int) -> None:
    """Stores hold gray (1) or RGB (3) images."""
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")


def fit_image(image: Image.Image, *, image_size: int, channels: int) -> np.ndarray:
    """Resize the shorter side to image_size and centre-crop (one antialiased bicubic resample)."""
    image = ImageOps.exif_transpose(image)
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    if (w, h) != (image_size, image_size):
        image = image.resize(
            (image_size, image_size),
            Image.Resampling.BICUBIC,
            box=(left, top, left + side, top + side),
        )
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def open_image(source: Any) -> Image.Image:
    """Open a path, a PIL image, raw bytes, a datasets-style {"bytes", "path"} dict or an array."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, np.ndarray):
        return Image.fromarray(source)
    image = Image.open(source)
    image.load()  # decode now, so a truncated file fails here and not later
    return image


def decode_all(
    items: Iterable[tuple[str, Any]],
    *,
    total: int,
    image_size: int,
    channels: int,
    progress: bool,
    desc: str,
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode (source, image) pairs; returns the stacked images, the kept positions and bad ones."""
    out = np.empty((total, image_size, image_size, channels), dtype=np.uint8)
    kept: list[int] = []
    bad: list[tuple[str, str]] = []
    for i, (source, item) in enumerate(tqdm(items, total=total, desc=desc, disable=not progress)):
        try:
            out[len(kept)] = fit_image(open_image(item), image_size=image_size, channels=channels)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append((source, f"{type(e).__name__}: {e}"))
            log.warning("skipping unreadable image %s (%s: %s)", source, type(e).__name__, e)
            continue
        kept.append(i)
    return out[: len(kept)], kept, bad
