import pytest

from diffprune.throughput import H200_BF16_DENSE_PEAK, mfu


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
