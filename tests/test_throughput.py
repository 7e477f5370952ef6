import pytest
import torch

from diffprune.throughput import (
    H200_BF16_DENSE_PEAK,
    TRAIN_FLOPS_PER_FORWARD,
    bf16_peak,
    device_peak,
    forward_flops,
    mfu,
)


def test_mfu_is_achieved_flops_over_peak():
    # 1 GFLOP per image at 1,000 images/s on a 4 TFLOP/s device uses a quarter of it
    assert mfu(1e9, 1_000.0, 4e12) == pytest.approx(0.25)
    assert mfu(1e9, 0.0) == 0.0
    assert mfu(H200_BF16_DENSE_PEAK, 1.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1.0, 1.0, 1.0), "flops_per_image = -1.0"),
        ((1.0, float("nan"), 1.0), "images_per_s = nan"),
        ((1.0, 1.0, 0.0), "peak = 0.0"),
    ],
)
def test_mfu_refuses_bad_numbers_by_name(args, message):
    with pytest.raises(ValueError, match=message):
        mfu(*args)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA H100 80GB HBM3", 989),  # the SXM part
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_dense_bf16_peaks_by_device_name(name, tflops):
    known = bf16_peak(name)
    assert (None if known is None else known[0] / 1e12) == tflops
    assert known is None or known[1].startswith("https://www.nvidia.com/")


def test_no_peak_is_assumed_for_the_cpu():
    assert device_peak(torch.device("cpu")) == (None, "no known bf16 peak for cpu")


class TwoLayers(torch.nn.Module):
    """A network with the diffusion models' call signature and a hand-countable cost."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

    def forward(self, x, timestep, class_labels=None):
        assert class_labels is None or len(class_labels) == len(x)
        return self.second(torch.relu(self.first(x.flatten(1) + timestep[:, None])))


def test_forward_flops_count_two_per_multiply_add_per_image():
    x, t = torch.randn(5, 1, 4, 4), torch.zeros(5)
    per_image = 2 * (16 * 32 + 32 * 4)
    assert forward_flops(TwoLayers(), x, t) == per_image
    labels = torch.zeros(5, dtype=torch.long)
    assert forward_flops(TwoLayers(), x, t, class_labels=labels) == per_image
    assert TRAIN_FLOPS_PER_FORWARD == 3
