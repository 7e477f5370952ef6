"""Decode images of any source into uint8 arrays at the store's size (image folders, hub rows).

Resizing happens here once, at build time: the shorter side to `image_size`, then a centre crop.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageMode, ImageOps
from tqdm.auto import tqdm

from diffprune.errors import ConfigError
from diffprune.io import load_json, open_memmap, save_json

log = logging.getLogger(__name__)

# (images uint8 NHWC, labels int64, sources, class names or None, bad files as (source, reason))
LoadedImages = tuple[np.ndarray, np.ndarray, list[str], list[str] | None, list[tuple[str, str]]]


def check_channels(channels: int) -> None:
    """Stores hold gray (1) or RGB (3) images."""
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")


# 16-bit gray modes: PIL's own convert("L") or ("RGB") clips every value above 255 (a 16-bit
# photo would turn almost white), so they are scaled here instead
WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
TIFF_BITS_PER_SAMPLE = 258


def declared_bits(image: Image.Image) -> int | None:
    """The bits per sample the file itself declares (TIFF's BitsPerSample); None when unknown."""
    tags = getattr(image, "tag_v2", None)
    bits = tags.get(TIFF_BITS_PER_SAMPLE) if tags is not None else None
    if isinstance(bits, tuple):
        bits = bits[0] if len(set(bits)) == 1 else None
    return bits if isinstance(bits, int) else None


def to_8bit(image: Image.Image, bits: int | None = None) -> Image.Image:
    """An image whose pixels are 8 bits per band; a ValueError when no scale is certain.

    The rule, one per kind of mode, so that no pixel is silently wrong:
    - 8 bits per band (1, L, P, LA, PA, RGB, RGBA, CMYK, YCbCr, LAB, HSV, ...): as they are; PIL's
      convert to L or RGB then maps them (alpha is dropped, as torchvision's loaders do).
    - 16-bit gray (I;16*): 0..65535 -> 0..255 (divided by 257).
    - 32-bit integer (I): the range is the file's declared bits per sample. A TIFF that declares
      16 bits is scaled as above; any other (32 bits, or no declaration: an array) is refused,
      since 230 could be 8-bit white-ish or 16-bit black and no choice is right for both.
    - 32-bit float (F): values in [0, 1] -> x255; anything else (NaN, negative, above 1) is
      refused, since floats carry no declared range.
    `bits` is what the original file declared (`declared_bits`), read before any transpose.
    """
    mode, kind = image.mode, ImageMode.getmode(image.mode).typestr[1:]
    if kind in ("u1", "b1"):
        return image
    if mode in WIDE_GRAY_MODES or (mode == "I" and bits == 16):
        wide = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    if mode == "I":
        raise ValueError(
            f"32-bit integer pixels (mode I, {bits or 'no'} declared bits per sample) have no "
            "certain range; allowed: 8- or 16-bit integers, or floats in [0, 1]"
        )
    if mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all():
            raise ValueError("float pixels (mode F) include NaN or infinity; allowed: [0, 1]")
        if pixels.min() < 0.0 or pixels.max() > 1.0:
            raise ValueError(
                f"float pixels (mode F) span [{pixels.min():g}, {pixels.max():g}]; "
                "allowed: floats in [0, 1] (scaled by 255), or 8- or 16-bit integers"
            )
        return Image.fromarray(np.rint(pixels * 255.0).astype(np.uint8))
    raise ValueError(f"pixel mode {mode!r} has no known 8-bit scale")


def fit_image(image: Image.Image, *, image_size: int, channels: int) -> np.ndarray:
    """Resize the shorter side to image_size and centre-crop (one antialiased bicubic resample)."""
    image = to_8bit(ImageOps.exif_transpose(image), declared_bits(image))
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
        try:
            return Image.fromarray(source)
        except TypeError as e:  # a dtype PIL has no mode for (int64, bool planes, ...)
            raise ValueError(f"an array of {source.dtype} {source.shape} is no image: {e}") from e
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
    scratch: Path | None = None,
    key: str = "",
    every: int = 256,
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode (source, image) pairs; returns the stacked images, the kept positions and bad ones.

    With a `scratch` folder the images go to a memory-mapped file there, not to memory, and the
    progress is saved every `every` items: a call that crashed resumes where it stopped, provided
    that `key` (what is decoded: the caller's list of sources) and the shape are the same.
    """
    shape = (total, image_size, image_size, channels)
    key = hashlib.sha256(key.encode()).hexdigest()
    if scratch is None or total == 0:
        out, done, bad = np.empty(shape, dtype=np.uint8), 0, []
    else:
        out, done, bad = _open_scratch(scratch, shape, key)
    bad_at = {position for position, _, _ in bad}
    kept = [i for i in range(done) if i not in bad_at]
    bar = tqdm(total=total, initial=done, desc=desc, disable=not progress)
    for i, (source, item) in enumerate(items):
        if i < done:
            continue
        try:
            out[len(kept)] = fit_image(open_image(item), image_size=image_size, channels=channels)
            kept.append(i)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append((i, source, f"{type(e).__name__}: {e}"))
            log.warning("skipping unreadable image %s (%s: %s)", source, type(e).__name__, e)
        bar.update()
        if scratch is not None and ((i + 1) % every == 0 or i + 1 == total):
            _save_progress(scratch, out, key=key, done=i + 1, bad=bad)
    bar.close()
    return out[: len(kept)], kept, [(source, reason) for _, source, reason in bad]


def _open_scratch(
    scratch: Path, shape: tuple[int, ...], key: str
) -> tuple[np.ndarray, int, list[tuple[int, str, str]]]:
    """The scratch images, how many items they cover and the bad ones among them (a fresh
    scratch when there is none, or when it holds other work)."""
    images, state = scratch / "images.npy", scratch / "progress.json"
    if images.is_file() and state.is_file():
        saved = load_json(state)
        if saved["key"] == key and saved["shape"] == list(shape):
            log.info("resuming decoding at item %d of %d (%s)", saved["done"], shape[0], scratch)
            out = np.lib.format.open_memmap(images, mode="r+")
            return out, saved["done"], [tuple(b) for b in saved["bad"]]
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    out = open_memmap(images, dtype=np.uint8, shape=shape)  # disk allocated first
    return out, 0, []


def _save_progress(scratch: Path, out: np.ndarray, **state: Any) -> None:
    """Flush the decoded images, then record how far they go (so the record never runs ahead).

    The record is O(bad items), not O(items): the kept positions are all the others.
    """
    out.flush()
    save_json(scratch / "progress.json", {**state, "shape": list(out.shape)})
