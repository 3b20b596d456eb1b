"""The UNet paper's weight map and weighted cross-entropy: hand-computed toys and properties."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unet.data.synthetic import make_synthetic_em
from unet.losses import weighted_cross_entropy
from unet.weight_map import border_weight_map, class_balance_weights, unet_weight_map, weight_map_stack


def test_two_single_pixel_cells_on_a_5x5_slice_by_hand():
    # Cells A = (0, 0) and B = (4, 4); 23 membrane pixels. w_c: cell 25 / (2 * 2) = 6.25,
    # membrane 25 / (2 * 23) = 25/46.
    label = np.zeros((5, 5), np.int64)
    label[0, 0] = label[4, 4] = 1
    w = unet_weight_map(label).astype(np.float64)
    assert w[0, 0] == pytest.approx(6.25) and w[4, 4] == pytest.approx(6.25)  # no border term on cells
    # (2, 2): d1 = d2 = sqrt(8) -> (d1 + d2)^2 = 32.  (0, 4): d1 = d2 = 4 -> 64.
    # (0, 1): d1 = 1, d2 = sqrt(3^2 + 4^2) = 5 -> 36.
    for (r, c), s2 in (((2, 2), 32.0), ((0, 4), 64.0), ((0, 1), 36.0)):
        assert w[r, c] == pytest.approx(25 / 46 + 10 * math.exp(-s2 / 50), rel=1e-6), (r, c)


def test_parallel_cells_give_a_constant_border_term():
    # Row: cell cols 0-1, membrane 2-4, cell cols 5-6: every membrane pixel has d1 + d2 = 4.
    cells = np.array([[1, 1, 0, 0, 0, 1, 1]], bool)
    border = border_weight_map(cells)
    expected = np.where(cells, 0.0, 10 * math.exp(-16 / 50))
    np.testing.assert_allclose(border, expected, rtol=1e-12)


def test_one_cell_has_no_border_term_and_window_changes_nothing():
    cells = np.zeros((20, 20), bool)
    cells[5:10, 5:10] = True
    assert (border_weight_map(cells) == 0).all()
    truth = make_synthetic_em(1, 96, 96, 0)[1][0] == 255
    # A window of 8 sigma gives the whole-slice distances' answer to within 1e-12.
    np.testing.assert_allclose(border_weight_map(truth), border_weight_map(truth, reach=1e9), atol=1e-12)


def test_class_balance_gives_each_class_the_same_total_weight():
    label = (make_synthetic_em(1, 64, 64, 1)[1][0] == 255).astype(np.int64)
    w = class_balance_weights(label)
    assert w[label == 0].sum() == pytest.approx(label.size / 2) and w[label == 1].sum() == pytest.approx(label.size / 2)
    assert w.mean() == pytest.approx(1.0)
    assert (class_balance_weights(np.ones((3, 3), np.int64)) == 1).all()  # one class present


def test_stack_matches_slices():
    labels = (make_synthetic_em(2, 48, 48, 2)[1] == 255).astype(np.int64)
    stack = weight_map_stack(labels)
    assert stack.shape == labels.shape and stack.dtype == np.float32
    np.testing.assert_array_equal(stack[1], unet_weight_map(labels[1]))


def test_weighted_ce_equals_plain_ce_with_unit_weights_and_weights_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 5, 6)
    target = torch.randint(0, 2, (2, 5, 6))
    ones = torch.ones(2, 5, 6)
    assert torch.allclose(weighted_cross_entropy(logits, target, ones), F.cross_entropy(logits, target))
    # Weight 3 on one pixel, 0 elsewhere: 3 * that pixel's CE / number of pixels.
    w = torch.zeros(2, 5, 6)
    w[1, 2, 3] = 3.0
    pixel_ce = -torch.log_softmax(logits[1, :, 2, 3], 0)[target[1, 2, 3]]
    assert torch.allclose(weighted_cross_entropy(logits, target, w), 3 * pixel_ce / 60)
    with pytest.raises(ValueError, match="weights"):
        weighted_cross_entropy(logits, target, ones[0])
