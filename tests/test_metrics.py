"""Metrics: hand-computed tiny cases, skimage cross-checks, real ISBI slices, mergeable state."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.measure import label as sk_label
from skimage.measure import shannon_entropy
from skimage.metrics import adapted_rand_error, variation_of_information

from unet.errors import UserError
from unet.metrics.cells import label_cells
from unet.metrics.segmentation import SegmentationMetrics, rand_info_scores


def _probs_from_cell_prob(p_cell):
    p_cell = torch.as_tensor(p_cell, dtype=torch.float32)
    return torch.stack([1 - p_cell, p_cell], dim=-3)


def _tiny_batch():
    # Image A: truth [[0,1],[1,1]], cell probabilities [[.2,.4],[.9,1]] -> argmax [[0,0],[1,1]].
    # Image B: all cell, predicted all cell with probability 1.
    probs = _probs_from_cell_prob([[[0.2, 0.4], [0.9, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    target = torch.tensor([[[0, 1], [1, 1]], [[1, 1], [1, 1]]])
    return probs, target


def test_hand_computed_dice_iou_pixel_error_soft_dice():
    m = SegmentationMetrics()
    probs, target = _tiny_batch()
    m.update(probs, target)
    r = m.compute()
    # Confusion over both images (rows truth, cols prediction): [[1, 0], [1, 6]].
    # membrane: tp 1, fp 1, fn 0 -> Dice 2/3, IoU 1/2; cell: tp 6, fp 0, fn 1 -> Dice 12/13, IoU 6/7.
    assert r["dice_membrane"] == pytest.approx(2 / 3)
    assert r["iou_membrane"] == pytest.approx(1 / 2)
    assert r["dice_cell"] == pytest.approx(12 / 13)
    assert r["iou_cell"] == pytest.approx(6 / 7)
    assert r["dice_mean"] == pytest.approx((2 / 3 + 12 / 13) / 2)
    assert r["iou_mean"] == pytest.approx((1 / 2 + 6 / 7) / 2)
    assert r["pixel_error"] == pytest.approx(1 / 8)
    # Soft Dice, image A: cell p = (.2,.4,.9,1), t = (0,1,1,1): 2*2.3 / (2.01 + 3) = 0.918164;
    #                     membrane p = (.8,.6,.1,0), t = (1,0,0,0): 2*0.8 / (1.01 + 1) = 0.796020.
    # Image B: cell 8/8 = 1; membrane empty in both -> eps/eps = 1 (NVIDIA's convention).
    assert r["dice_nvidia"] == pytest.approx((0.918164 + 0.796020 + 1 + 1) / 4, abs=1e-6)
    assert r["num_images"] == 2


def test_absent_class_is_nan_and_left_out_of_means():
    m = SegmentationMetrics()
    m.update(_probs_from_cell_prob(torch.ones(4, 4)), torch.ones(4, 4, dtype=torch.long))
    r = m.compute()
    assert math.isnan(r["dice_membrane"]) and math.isnan(r["iou_membrane"])
    assert r["dice_cell"] == 1 and r["iou_cell"] == 1
    assert r["dice_mean"] == 1 and r["iou_mean"] == 1
    assert r["pixel_error"] == 0


def test_empty_accumulator_is_nan():
    r = SegmentationMetrics().compute()
    assert r["num_images"] == 0
    assert all(math.isnan(v) for k, v in r.items() if k != "num_images")


def test_rand_info_hand_computed():
    # Truth: two cells of 3 pixels; prediction splits them with 2 membrane pixels in between.
    t = np.array([[1, 1, 1, 2, 2, 2]])
    s = np.array([[1, 1, 0, 0, 2, 2]])
    r = rand_info_scores(t, s)
    # ISBI/Fiji: predicted-membrane pixels are singletons. n_ij = 2, 2, 1, 1; a = 3, 3; b = 2, 2, 1, 1.
    # V_Rand = 2 * 10 / (18 + 10) = 0.714286, split 10/18, merge 10/10.
    assert r["v_rand"] == pytest.approx(20 / 28)
    assert r["v_rand_split"] == pytest.approx(10 / 18)
    assert r["v_rand_merge"] == pytest.approx(1.0)
    # H(T) = ln 2 = 0.693147; H(S) = H(S,T) = -(2/3 ln 1/3 + 1/3 ln 1/6) = 1.329661; I = H(T).
    # V_Info = 2 * 0.693147 / (0.693147 + 1.329661) = 0.685331, split I/H(S) = 0.521296, merge 1.
    assert r["v_info"] == pytest.approx(0.685331, abs=1e-6)
    assert r["v_info_split"] == pytest.approx(0.521296, abs=1e-6)
    assert r["v_info_merge"] == pytest.approx(1.0)
    # skimage convention: the membrane pixels form one segment that merges the two cells.
    r = rand_info_scores(t, s, pred_background="segment")
    assert r["v_rand"] == pytest.approx(20 / 30)  # sum b^2 = 4 + 4 + 4


def test_rand_info_degenerate_cases():
    t = np.array([[0, 1, 1, 0]])
    assert all(math.isnan(v) for v in rand_info_scores(np.zeros_like(t), t).values())
    assert rand_info_scores(t, t) == dict.fromkeys(rand_info_scores(t, t), 1.0)
    r = rand_info_scores(t, np.zeros_like(t))  # everything predicted membrane: all singletons
    assert r["v_rand_merge"] == 1 and r["v_rand_split"] == pytest.approx(2 / 4)


def _singletons(labels, start):
    """Give each background pixel its own label (the ISBI convention, spelled out for skimage)."""
    out = labels.copy()
    bg = out == 0
    out[bg] = start + np.arange(np.count_nonzero(bg))
    return out


def _skimage_v_info(t, s):
    """V_Info from skimage's conditional entropies (bits) and Shannon entropies of the restricted labels."""
    h_s_given_t, h_t_given_s = variation_of_information(t, s, ignore_labels=[0])
    fg = t > 0
    h_t, h_s = shannon_entropy(t[fg]), shannon_entropy(s[fg])
    mutual = h_t - h_t_given_s
    assert mutual == pytest.approx(h_s - h_s_given_t)
    return 2 * mutual / (h_t + h_s)


def _check_against_skimage(t, s):
    # skimage's conventions switched on: exact agreement.
    ours = rand_info_scores(t, s, pred_background="segment", exclude_self_pairs=True)
    assert ours["v_rand"] == pytest.approx(1 - adapted_rand_error(t, s)[0], abs=1e-12)
    assert ours["v_info"] == pytest.approx(_skimage_v_info(t, s), abs=1e-9)
    # ISBI conventions: predicted background as singletons, spelled out for skimage by relabelling.
    s1 = _singletons(s, s.max() + 1)
    ours = rand_info_scores(t, s, exclude_self_pairs=True)
    assert ours["v_rand"] == pytest.approx(1 - adapted_rand_error(t, s1)[0], abs=1e-12)
    default = rand_info_scores(t, s)
    assert default["v_info"] == pytest.approx(_skimage_v_info(t, s1), abs=1e-9)
    # N^2 normalisation (default) differs from pair counting by O(1 / segment size) only.
    assert default["v_rand"] == pytest.approx(ours["v_rand"], abs=2e-2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rand_info_match_skimage_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    t = sk_label(ndimage.binary_opening(rng.random((64, 80)) > 0.35), connectivity=1)
    s = sk_label(rng.random((64, 80)) > 0.4, connectivity=1)
    _check_against_skimage(t, s)


def test_label_cells_is_4_connected():
    mask = np.array([[1, 0], [0, 1]], dtype=bool)  # diagonal neighbours: two cells with 4-connectivity
    assert label_cells(mask).max() == 2
    assert np.array_equal(label_cells(mask), sk_label(mask, connectivity=1))


def _perturbations(cell):
    rng = np.random.default_rng(0)
    yield "identity", cell
    yield "eroded", ndimage.binary_erosion(cell, iterations=2)
    yield "dilated", ndimage.binary_dilation(cell, iterations=2)
    yield "shifted", np.roll(cell, (3, -2), axis=(0, 1))
    yield "noised", cell ^ (rng.random(cell.shape) < 0.02)


def test_real_isbi_slices_against_skimage(isbi_dir):
    tifffile = pytest.importorskip("tifffile")
    labels = tifffile.imread(isbi_dir / "train-labels.tif")
    for z in (0, 17):
        cell = labels[z] > 127  # 255 = cell interior, 0 = membrane
        t = sk_label(cell, connectivity=1)
        for name, pred in _perturbations(cell):
            s = sk_label(pred, connectivity=1)
            _check_against_skimage(t, s)
            m = SegmentationMetrics()
            probs = _probs_from_cell_prob(pred.astype(np.float32))
            m.update(probs, torch.from_numpy(cell.astype(np.int64)))
            r = m.compute()
            ref = rand_info_scores(t, s)
            assert r["v_rand"] == pytest.approx(ref["v_rand"]) and r["v_info"] == pytest.approx(ref["v_info"])
            if name == "identity":
                assert r["v_rand"] == 1 and r["v_info"] == pytest.approx(1) and r["pixel_error"] == 0
            else:
                assert r["v_rand"] < 1 and r["v_info"] < 1


def _random_batch(rng, n=3, shape=(32, 40)):
    cell = ndimage.binary_opening(rng.random((n, *shape)) > 0.3, structure=np.ones((1, 3, 3)))
    p = np.clip(cell + rng.normal(0, 0.4, cell.shape), 0, 1).astype(np.float32)
    return _probs_from_cell_prob(p), torch.from_numpy(cell.astype(np.int64))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        # Soft Dice per image is summed in float32 on the device, so batching may move the last digits.
        rel = 1e-6 if k == "dice_nvidia" else 1e-12
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], rel=rel), k


def test_merge_and_summed_state_equal_one_accumulator():
    rng = np.random.default_rng(0)
    batches = [_random_batch(rng) for _ in range(4)]
    whole, part1, part2 = SegmentationMetrics(), SegmentationMetrics(), SegmentationMetrics()
    for i, (p, t) in enumerate(batches):
        whole.update(p, t)
        (part1 if i % 2 else part2).update(p[0], t[0])  # also exercise the unbatched (K, H, W) form
        (part1 if i % 2 else part2).update(p[1:], t[1:])
    expected = whole.compute()
    assert expected["num_images"] == 12
    state = part1.state() + part2.state()  # what dist.all_reduce(SUM) does
    assert state.dtype == torch.float64 and state.dim() == 1
    reduced = SegmentationMetrics()
    reduced.load_state(state)
    _assert_same(reduced.compute(), expected)
    _assert_same(part1.merge(part2).compute(), expected)
    whole.reset()
    assert whole.compute()["num_images"] == 0


def test_v_scores_are_mean_over_images():
    rng = np.random.default_rng(1)
    p, t = _random_batch(rng, n=2)
    m = SegmentationMetrics()
    m.update(p, t)
    per_image = [rand_info_scores(label_cells(t[i].numpy() == 1), label_cells(p[i].argmax(0).numpy() == 1))
                 for i in range(2)]
    assert m.compute()["v_rand"] == pytest.approx((per_image[0]["v_rand"] + per_image[1]["v_rand"]) / 2)
    assert m.compute()["v_info"] == pytest.approx((per_image[0]["v_info"] + per_image[1]["v_info"]) / 2)


def test_bad_inputs():
    m = SegmentationMetrics()
    with pytest.raises(UserError, match="0..1"):
        m.update(_probs_from_cell_prob(torch.zeros(4, 4)), torch.full((4, 4), 255))
    with pytest.raises(ValueError):
        m.update(torch.zeros(2, 4, 4), torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ValueError):
        m.update(torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        m.load_state(torch.zeros(3))
