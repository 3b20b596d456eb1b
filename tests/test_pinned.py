"""Three properties a one-line change could break with the rest of the suite green (issue 19 item 7), each pinned
by a known answer worked out by hand: the instance threshold at equality, seeds restricted to cells, and the
intensity augmentation's formulas."""
import math

import numpy as np
import pytest
import torch

from unet.data.augment import AugmentConfig, intensity
from unet.prediction.instances import InstanceOptions, cell_instances


@pytest.mark.parametrize("threshold", [0.5, 0.25])
def test_a_pixel_exactly_at_the_threshold_is_membrane(threshold):
    # Two cells (probability 1) either side of one column at exactly the threshold. "A pixel may belong to a
    # cell iff cell_prob > threshold": the column is membrane (0) and the cells stay apart. With >= they would
    # be one component, one id.
    prob = np.ones((5, 5))
    prob[:, 2] = threshold
    lab = cell_instances(prob, InstanceOptions(threshold=threshold, smooth=0.0, fill=False))
    expected = np.array([[1, 1, 0, 2, 2]] * 5)
    assert np.array_equal(lab, expected)


def test_a_dip_inside_a_wide_membrane_band_never_becomes_a_cell():
    # Cells at columns 0-2 and 12-14; columns 3-11 are membrane (cell probability 0) except a dip to 0.4 in
    # column 7: a regional minimum of the membrane probability (depth 0.4 >= h 0.2), so an h-minimum, but below
    # the threshold. Seeds are restricted to cells, so with fill on the band is flooded from the two cells only.
    prob = np.zeros((7, 15))
    prob[:, :3] = prob[:, 12:] = 1.0
    prob[:, 7] = 0.4
    lab = cell_instances(prob, InstanceOptions(threshold=0.5, seeds="hminima", seed_h=0.2, smooth=0.0, fill=True))
    # Known answer: the band is flooded from the two cells alone and meets at the dip, which becomes the
    # one-pixel watershed line; a seed in the dip would have made a third id there instead.
    expected = np.array([[1] * 7 + [0] + [2] * 7] * 7)
    assert np.array_equal(lab, expected)


class ScriptedRng:
    """Stands in for numpy's Generator: ``uniform`` returns the scripted values and records its ranges."""

    def __init__(self, values):
        self.values, self.ranges = list(values), []

    def uniform(self, low, high):
        self.ranges.append((low, high))
        value = self.values.pop(0)
        assert low <= value <= high
        return value

    def random(self):
        raise AssertionError("noise and blur are off: no coin is tossed")


def test_intensity_formulas_gamma_then_contrast_around_the_tile_mean_then_brightness():
    cfg = AugmentConfig(gamma=1.0, contrast=0.2, brightness=0.1, noise_prob=0.0, blur_prob=0.0)
    rng = ScriptedRng([math.log(2.0), 1.2, 0.1])  # exponent e^ln2 = 2, contrast x1.2, brightness +0.1
    tile = torch.tensor([[[0.25, 0.75]]])
    out = intensity(tile, rng, cfg)
    # gamma: [0.0625, 0.5625], mean 0.3125; contrast around it: (x - 0.3125) * 1.2 + 0.3125 = [0.0125, 0.6125];
    # brightness: [0.1125, 0.7125].
    assert torch.allclose(out, torch.tensor([[[0.1125, 0.7125]]]), atol=1e-6)
    assert rng.ranges == [(-1.0, 1.0), (0.8, 1.2), (-0.1, 0.1)]


def test_intensity_clips_to_the_unit_range():
    cfg = AugmentConfig(gamma=0.0, contrast=0.0, brightness=0.1, noise_prob=0.0, blur_prob=0.0)
    out = intensity(torch.tensor([[[0.0, 0.95]]]), ScriptedRng([0.1]), cfg)
    assert torch.equal(out, torch.tensor([[[0.1, 1.0]]]))
