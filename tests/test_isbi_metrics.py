"""ISBI 2012 challenge scores (Fiji's protocol): hand-computed slices, threshold loop, stack maximum."""
import math

import numpy as np
import pytest
from scipy import ndimage

from unet.data.synthetic import make_synthetic_em
from unet.metrics.isbi import (FIJI_THRESHOLDS, ThinnedScores, fiji_slice_scores, fiji_thresholds,
                               isbi_thinned_scores, thinned_slice_scores)
from unet.metrics.cells import label_cells
from unet.metrics.segmentation import rand_info_scores

# 2 x 7 truth: cell A = columns 0-2, membrane = column 3, cell B = columns 4-6 (n = 12, a = (6, 6)).
TRUTH = np.array([[1, 1, 1, 0, 1, 1, 1]] * 2, bool)


def test_threshold_loop_is_fijis_floating_point_loop():
    # Java: for (double th = 0.0; th <= 1.0; th += 0.1): the accumulated rounding gives these doubles.
    assert FIJI_THRESHOLDS == (0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6, 0.7,
                               0.7999999999999999, 0.8999999999999999, 0.9999999999999999)
    assert fiji_thresholds(0.0, 0.0, 0.1) == (0.0,)


def test_perfect_split_and_merge_by_hand():
    # Perfect: the membrane column 3 touches A on its left and B on its right -> dams; scores 1.
    assert thinned_slice_scores(TRUTH.astype(float), TRUTH, (0.5,)).tolist() == [[1.0, 1.0]]
    # All cell: one predicted segment of 12. n_ij = (6, 6): tp = 36 + 36 = 72, sum b^2 = 144 -> fp = 72,
    # sum a^2 = 72 -> fn = 0. P = 1/2, R = 1, V_Rand = 2 * 1/2 / (3/2) = 2/3.  H(S) = 0 -> V_Info = 0.
    v_rand, v_info = thinned_slice_scores(np.ones((2, 7)), TRUTH, (0.5,))[0]
    assert v_rand == pytest.approx(2 / 3, abs=1e-15) and v_info == 0.0


def _false_split_expected():
    # Proposal membrane at column 1 (inside A) and column 3. Thinning: column 1 sees P (col 0) and Q
    # (col 2) -> dams = 2 one-pixel segments inside A; column 3 sees Q and R -> dam in true membrane (ignored).
    # Segments on the true foreground: P = 2, Q = 2, R = 6 (cols 4-6), n0 = 2 singletons.
    # tp = 2^2 + 2^2 + 6^2 + 2 = 46; sum b^2 + n0 = 4 + 4 + 36 + 2 = 46 -> fp = 0, P = 1;
    # sum a^2 = 72 -> fn = 26, R = 46/72; V_Rand = 2 R / (1 + R) = 92 / 118 = 46/59.
    # Info: every predicted segment lies in one true cell, so H(T, S) = H(S) and I = H(T) = ln 2;
    # H(S) = 2 * (2/12) ln 6 + (6/12) ln 2 + 2 * (1/12) ln 12; V_Info = 2 I / (H(T) + H(S)).
    h_s = 2 * (2 / 12) * math.log(6) + 0.5 * math.log(2) + 2 / 12 * math.log(12)
    return 46 / 59, 2 * math.log(2) / (math.log(2) + h_s)


def test_dams_inside_true_cells_are_one_pixel_segments():
    prob = TRUTH.astype(float)
    prob[:, 1] = 0.0
    v_rand, v_info = thinned_slice_scores(prob, TRUTH, (0.5,))[0]
    exp_rand, exp_info = _false_split_expected()
    assert v_rand == pytest.approx(exp_rand, abs=1e-15)
    assert v_info == pytest.approx(exp_info, abs=1e-14)


def test_value_equal_to_threshold_is_membrane():
    # A bridge pixel of exactly 0.5 joins A and B for th = 0.4 but not for th = 0.5 (cell iff value > th).
    prob = TRUTH.astype(float)
    prob[0, 3] = 0.5
    scores = thinned_slice_scores(prob, TRUTH, (0.4, 0.5))
    assert scores[0, 0] == pytest.approx(2 / 3, abs=1e-15) and scores[1].tolist() == [1.0, 1.0]


def test_values_are_read_as_float32_and_compared_in_double_like_java():
    # float32(0.3) = 0.30000001192... > 0.30000000000000004 in double: cell (a float32 comparison would
    # round the threshold to the same float32 and call it membrane). float64 0.3 is rounded to float32 first.
    for bridge in (np.float32(0.3), 0.3):
        prob = TRUTH.astype(np.float32 if isinstance(bridge, np.float32) else np.float64)
        prob[0, 3] = bridge
        v_rand = thinned_slice_scores(prob, TRUTH, (FIJI_THRESHOLDS[3],))[0, 0]
        assert v_rand == pytest.approx(2 / 3, abs=1e-15)  # bridged: A and B merged


def test_stack_score_is_max_over_thresholds_of_slice_means():
    # Slice 1: bridge of 0.75 -> merged (2/3, 0) up to th = 0.7, perfect from 0.7999999999999999.
    # Slice 2: false split of 0.25 -> perfect up to th = 0.2, the hand case above from 0.30000000000000004.
    # Means: th <= 0.2 -> (2/3 + 1) / 2 = 5/6; th >= 0.8 -> (1 + 46/59) / 2 = 105/118 (the maximum);
    # a mean of per-slice maxima would be 1.
    p1, p2 = TRUTH.astype(float), TRUTH.astype(float)
    p1[0, 3], p2[:, 1] = 0.75, 0.25
    out = isbi_thinned_scores(np.stack([p1, p2]), np.stack([TRUTH, TRUTH]))
    exp_rand, exp_info = _false_split_expected()
    assert out["v_rand_thinned"] == pytest.approx(105 / 118, abs=1e-15)
    assert out["v_rand_threshold"] == 0.7999999999999999
    assert out["v_rand_curve"][0] == pytest.approx(5 / 6, abs=1e-15)
    assert out["v_info_thinned"] == pytest.approx((1 + exp_info) / 2, abs=1e-14)
    assert out["v_info_threshold"] == 0.7999999999999999


def test_agrees_with_rand_info_scores_on_ordinary_slices():
    truth = label_cells(make_synthetic_em(1, 96, 96, 3)[1][0] > 0)
    rng = np.random.default_rng(0)
    pred = label_cells(ndimage.gaussian_filter(rng.random((96, 96)), 2) > 0.5)
    v_rand, v_info = fiji_slice_scores(truth, pred)
    ref = rand_info_scores(truth, pred)
    assert v_rand == pytest.approx(ref["v_rand"], rel=1e-12) and v_info == pytest.approx(ref["v_info"], rel=1e-12)


def _synthetic_truth(seed=0, size=128):
    return make_synthetic_em(1, size, size, seed)[1][0] > 0


def test_perfect_proposal_scores_one_and_inverted_polarity_does_not():
    truth = _synthetic_truth()
    out = isbi_thinned_scores(truth.astype(float), truth)
    assert out["v_rand_thinned"] == 1.0 and out["v_info_thinned"] == 1.0
    assert out["v_rand_threshold"] == 0.0  # reached first at the first threshold, as Fiji's scan keeps it
    inverted = isbi_thinned_scores(1.0 - truth, truth)  # a membrane map passed as if it were cells
    assert inverted["v_rand_thinned"] < 0.5 and inverted["v_info_thinned"] < 0.8


def test_thinning_recovers_a_grid_behind_thick_membranes():
    # Truth: 8 x 8 cells of 15 x 15 separated by 1-pixel lines. Proposal: the lines dilated to width 5.
    # Flooding puts the dams back on the middle line, so the thinned score is 1; scored as plain
    # connected components (no thinning) the eroded cells lose their rims and score lower.
    truth = np.ones((128, 128), bool)
    truth[15::16, :] = False
    truth[:, 15::16] = False
    thick = ~ndimage.binary_dilation(~truth, iterations=2)
    out = isbi_thinned_scores(thick.astype(float), truth)
    assert out["v_rand_thinned"] == 1.0 and out["v_info_thinned"] == pytest.approx(1.0, abs=1e-12)
    plain = rand_info_scores(label_cells(truth), label_cells(thick))
    assert plain["v_rand"] < 0.8


def test_accumulator_state_merges_like_one_pass():
    truth = np.stack([_synthetic_truth(s, 64) for s in range(3)])
    rng = np.random.default_rng(1)
    prob = np.clip(truth + rng.normal(0, 0.4, truth.shape), 0, 1)
    whole = isbi_thinned_scores(prob, truth)
    a, b = ThinnedScores(), ThinnedScores()
    a.update(prob[0], truth[0])
    for p, t in zip(prob[1:], truth[1:]):
        b.update(p, t)
    merged = ThinnedScores()
    merged.load_state(a.state() + b.state())
    out = merged.compute()  # (a) + (b + c) instead of (a + b) + c: equal to rounding
    for key, value in whole.items():
        assert out[key] == pytest.approx(value, abs=1e-15), key
    assert 0.9 < whole["v_rand_thinned"] < 1.0
    assert math.isnan(ThinnedScores().compute()["v_rand_thinned"])


def test_real_isbi_labels_score_one_against_themselves(isbi_dir):
    import tifffile
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[:2] > 0
    out = isbi_thinned_scores(labels.astype(float), labels)
    assert out["v_rand_thinned"] == 1.0 and out["v_info_thinned"] == pytest.approx(1.0, abs=1e-12)
