"""Store images to model tensors and back: the one place where scaling and resizing happen."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_model_input(images_uint8_nhwc: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 (N,H,W,C) -> float32 (N,C,res,res) in [-1,1]; antialiased bicubic resize if needed."""
    images = np.asarray(images_uint8_nhwc)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N,H,W,C), got {images.dtype}{images.shape}")
    # a copy: store images are read-only memory maps, which torch.from_numpy warns about
    x = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).float()
    x = x / 127.5 - 1.0
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True)
        x = x.clamp(-1.0, 1.0)
    return x.contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N,C,H,W) in [-1,1] -> uint8 (N,H,W,C); exact inverse of to_model_input's scaling."""
    if x.ndim != 4:
        raise ValueError(f"expected a (N,C,H,W) tensor, got shape {tuple(x.shape)}")
    u = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return u.permute(0, 2, 3, 1).cpu().numpy()


def at_resolution(images: np.ndarray, resolution: int, *, batch_size: int = 4096) -> np.ndarray:
    """uint8 NHWC images resized to `resolution` exactly as training sees them."""
    return np.concatenate(
        [
            to_uint8(to_model_input(np.asarray(images[i : i + batch_size]), resolution))
            for i in range(0, len(images), batch_size)
        ]
    )
