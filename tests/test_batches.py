"""row_batches: rows in order through a DataLoader, the workers mapping the file themselves."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import torch

from diffprune.batches import _as_tensor, _Batches, resolve_num_workers, row_batches
from diffprune.data.tensors import to_model_input
from diffprune.errors import ConfigError


@pytest.fixture(scope="module")
def mapped(tmp_path_factory) -> np.memmap:
    """103 uint8 images (7x5x3) saved as .npy and mapped read-only, as load_store maps a store."""
    rows = np.random.default_rng(0).integers(0, 256, (103, 7, 5, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("batches") / "images.npy"
    np.save(path, rows)
    return np.load(path, mmap_mode="r")


def _joined(batches) -> tuple[list[slice], np.ndarray]:
    rows, parts = zip(*batches, strict=True)
    return list(rows), torch.cat(parts).numpy()


@pytest.mark.parametrize("workers", [0, 2])
def test_rows_come_in_order_in_contiguous_batches(mapped, workers):
    rows, out = _joined(row_batches(mapped, 10, num_workers=workers))
    assert rows == [slice(s, min(s + 10, 103)) for s in range(0, 103, 10)]
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, mapped)


def test_spawned_workers_map_the_file_and_run_the_transform(mapped):
    transform = functools.partial(to_model_input, resolution=4)
    _, out = _joined(row_batches(mapped[3:], 25, transform=transform, num_workers=2,
                                 multiprocessing_context="spawn"))  # fmt: skip
    # the same floats, bit for bit, as the transform of the whole array in this process
    np.testing.assert_array_equal(out, to_model_input(np.asarray(mapped[3:]), 4).numpy())


def test_a_memory_map_is_never_pickled_with_its_data(mapped):
    view = mapped[50:]  # a view: its own `offset` attribute is the whole map's
    dataset = _Batches(view, 8, _as_tensor)
    state = pickle.dumps(dataset)
    assert len(state) < 1000 < view.nbytes
    copy = pickle.loads(state)
    assert copy.array is None and len(copy) == 7
    np.testing.assert_array_equal(copy[0].numpy(), view[:8])
    np.testing.assert_array_equal(copy[6].numpy(), view[48:])
    with pytest.raises(IndexError):
        copy[7]
    in_memory = _Batches(np.asarray(view).copy(), 8, _as_tensor)
    assert len(pickle.dumps(in_memory)) > view.nbytes  # the data travels with it


def test_in_memory_arrays_and_pinned_batches(mapped):
    rows = np.arange(12.0).reshape(6, 2)
    _, out = _joined(row_batches(rows, 4, num_workers=2))
    np.testing.assert_array_equal(out, rows)
    pinned = list(row_batches(rows, 4, pin_memory=torch.cuda.is_available()))
    assert [len(batch) for _, batch in pinned] == [4, 2]


def test_strided_memory_maps_are_refused(mapped):
    with pytest.raises(ValueError, match="strided view"):
        next(row_batches(mapped[::2], 4))


def test_num_workers_auto_and_bad_values():
    assert resolve_num_workers("auto", torch.device("cpu"), key="embed.num_workers") == 0
    cuda = resolve_num_workers("auto", torch.device("cuda"), key="embed.num_workers")
    assert 1 <= cuda <= 8
    assert resolve_num_workers(3, torch.device("cpu"), key="embed.num_workers") == 3
    for bad in (-1, "four", 2.0, True):
        with pytest.raises(ConfigError, match=r"embed.num_workers = .*: allowed: auto or an"):
            resolve_num_workers(bad, torch.device("cpu"), key="embed.num_workers")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(row_batches(np.zeros((3, 1)), 0))
