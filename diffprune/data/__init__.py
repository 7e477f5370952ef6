"""Image stores and their sources, one module each.

- `store`: the store on disk (`images.npy` uint8 N,H,W,C, `index.parquet`, `store.json`)
- `build`: `build_store`, one split of a source into a store (the `download` rule)
- `fashion_mnist`, `image_folder`, `huggingface`: the sources; `decode`: their shared decoding
  (resumable, into a memory-mapped scratch file); `fingerprint`: what a local source holds now
- `tensors`: store images to model tensors and back (`to_model_input`, `to_uint8`,
  `at_resolution`)

The public names below are imported from their module on first use, so that reading one module
(the Snakefile reads a folder's fingerprint while it plans) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Store": "store",
    "load_store": "store",
    "build_store": "build",
    "holdout_mask": "build",
    "subset_indices": "build",
    "SOURCES": "build",
    "SPLITS": "build",
    "FASHION_MNIST_CLASSES": "fashion_mnist",
    "FASHION_MNIST_FILES": "fashion_mnist",
    "load_fashion_mnist": "fashion_mnist",
    "read_idx": "fashion_mnist",
    "list_images": "image_folder",
    "load_imagefolder": "image_folder",
    "load_huggingface": "huggingface",
    "images_from_rows": "huggingface",
    "to_model_input": "tensors",
    "to_uint8": "tensors",
    "at_resolution": "tensors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
