"""Known answers a subtle bug would change: model FLOPs, the Gaussian blend, V_Rand over slices without cells."""
import math

import numpy as np
import pytest
import torch

from unet.benchmarking import model_flops
from unet.metrics.segmentation import SegmentationMetrics
from unet.model import UNet
from unet.prediction.tiles import predict_slice
from unet.prediction.tiling import TilingOptions


def _conv(cin, cout, k, h, w):
    """Multiply-adds x 2 of a convolution producing (or, transposed, reading) an h x w map."""
    return 2 * cin * cout * k * k * h * w


def test_model_flops_is_the_sum_over_convolutions():
    model = UNet(base_filters=4, depth=2, padding="same")  # 16x16 input, one pooling to 8x8
    first = _conv(1, 4, 3, 16, 16)
    forward = [first, _conv(4, 4, 3, 16, 16),                    # encoder level 1
               _conv(4, 8, 3, 8, 8), _conv(8, 8, 3, 8, 8),         # bottleneck at 8x8
               _conv(8, 4, 3, 8, 8),                                # transposed conv 8x8 -> 16x16 (per input pixel)
               _conv(8, 4, 3, 16, 16), _conv(4, 4, 3, 16, 16),     # decoder on the concatenation (4 + 4)
               _conv(4, 2, 1, 16, 16)]                              # 1x1 head
    assert sum(forward) == 464_896
    assert model_flops(model, (1, 1, 16, 16), backward=False) == sum(forward)
    # Backward: a gradient for the weights and one for the input of every convolution, except the first
    # (the image needs no gradient).
    assert model_flops(model, (1, 1, 16, 16)) == 3 * sum(forward) - first
    assert model_flops(model, (3, 1, 16, 16)) == 3 * (3 * sum(forward) - first)


def _gaussian_weights(size):
    """The blend window written out: exp(-d^2 / (2 sigma^2)), sigma = size / 8, peak 1, floor 1e-3."""
    d = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (d / (size / 8)) ** 2)
    return np.maximum(np.outer(g, g) / g.max() ** 2, 1e-3)


class _Same16:
    padding = "same"

    def output_size(self, n):
        if n % 16:
            raise ValueError(n)
        return n

    def valid_input_size(self, n):
        return max(1, math.ceil(n / 16)) * 16

    def input_size_for_output(self, n):
        return self.valid_input_size(n)


def test_two_overlapping_windows_blend_with_gaussian_weights():
    # Each window predicts a constant, its own top-left input pixel: 0 for the left window, 1 for the right.
    image = torch.zeros(1, 16, 24)
    image[0, 0, 8] = 1.0
    out = predict_slice(lambda x: x[:, :, :1, :1].expand_as(x).clone(), image,
                        TilingOptions(tile_size=16, overlap=0.5, blend="gaussian"), geometry=_Same16())
    w = _gaussian_weights(16)
    left = np.zeros((16, 24))
    right = np.zeros((16, 24))
    left[:, :16], right[:, 8:] = w, w
    expected = right / (left + right)  # weighted mean of 0 (left window) and 1 (right window)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    # Column 11 is 3.5 px from the left centre, 4.5 from the right (sigma 2): weight ratio e^((4.5^2-3.5^2)/8) = e.
    assert out[0, 8, 11].item() == pytest.approx(1 / (1 + math.e), rel=1e-5)
    assert out[0, 8, 12].item() == pytest.approx(math.e / (1 + math.e), rel=1e-5)


def test_slice_without_true_cells_is_left_out_of_v_rand_not_scored_zero():
    truth = torch.zeros(2, 16, 16, dtype=torch.long)
    truth[0, 2:7, 2:7] = 1   # two cells in slice 0 ...
    truth[0, 9:14, 9:14] = 1
    # ... slice 1 is all membrane: V_Rand / V_Info are undefined there
    probs = torch.stack([1 - truth.float(), truth.float()], dim=1)  # a perfect prediction
    probs[1, 1, 4:8, 4:8], probs[1, 0, 4:8, 4:8] = 1.0, 0.0          # a false cell in slice 1
    m = SegmentationMetrics()
    m.update(probs, truth)
    result = m.compute()
    assert result["v_rand"] == 1.0 and result["v_info"] == 1.0 and result["num_images"] == 2
