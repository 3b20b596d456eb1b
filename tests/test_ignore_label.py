"""Ignored pixels (unet.data.labels.IGNORE, sparse labels) in the losses and the metrics: known answers worked
out by hand, each equal to the same quantity computed on the labelled pixels alone."""
import math

import numpy as np
import pytest
import torch

from unet.data.labels import IGNORE
from unet.losses import ce_dice_loss, weighted_cross_entropy
from unet.metrics.cells import label_cells
from unet.metrics.instances import InstanceScores
from unet.metrics.isbi import ThinnedScores, thinned_slice_scores
from unet.metrics.segmentation import SegmentationMetrics
from unet.weight_map import class_balance_weights, unet_weight_map

EPS = 1e-6
L3 = math.log(3)


def _binary_logits(z):
    """(1, 2, H, W) logits (0, z): the cell probability is sigmoid(z)."""
    z = torch.tensor(z, dtype=torch.float32)
    return torch.stack([torch.zeros_like(z), z])[None]


def _example_2x3():
    # Cell probabilities sigmoid(z): (0,0) .75, (0,1) .25, (1,1) .5, (1,2) .75; the two ignored pixels are
    # predicted confidently wrong-or-right (z = +-5) so that counting them would move every term.
    logits = _binary_logits([[L3, -L3, 5.0], [-5.0, 0.0, L3]])
    target = torch.tensor([[[1, 0, IGNORE], [IGNORE, 1, 0]]], dtype=torch.uint8)
    labelled = target[0] != IGNORE
    # The labelled pixels alone, as a 1x4 image.
    alone_logits = logits[0][:, labelled][None, :, None]
    alone_target = target[0][labelled][None, None]
    return logits, target, alone_logits, alone_target


# CE over the 4 labelled pixels: true-class probabilities .75, .75, .5, .25.
CE_2X3 = (2 * math.log(4 / 3) + math.log(2) + math.log(4)) / 4  # 0.663702
# Soft Dice over labelled pixels; cell: p = (.75, .25, .5, .75), t = (1, 0, 1, 0): 2 * 1.25 / (1.4375 + 2);
# membrane: p = (.25, .75, .5, .25), t = (0, 1, 0, 1): 2 * 1.0 / (0.9375 + 2).
DICE_CELL_2X3 = (2.5 + EPS) / (3.4375 + EPS)  # 8/11
DICE_MEMBRANE_2X3 = (2.0 + EPS) / (2.9375 + EPS)  # 32/47
LOSS_2X3 = CE_2X3 + 1 - (DICE_CELL_2X3 + DICE_MEMBRANE_2X3) / 2  # 0.959640


def test_2x3_ce_dice_with_ignore_is_the_loss_of_the_labelled_pixels():
    logits, target, alone_logits, alone_target = _example_2x3()
    assert CE_2X3 == pytest.approx(0.663702, abs=1e-6) and LOSS_2X3 == pytest.approx(0.959640, abs=1e-6)
    logits.requires_grad_()
    loss = ce_dice_loss(logits, target)
    assert loss.item() == pytest.approx(LOSS_2X3, abs=1e-6)
    assert loss.item() == pytest.approx(ce_dice_loss(alone_logits, alone_target).item(), abs=1e-6)
    loss.backward()
    ignored = target[0] == IGNORE
    assert torch.all(logits.grad[0][:, ignored] == 0)  # ignored pixels receive no gradient
    assert torch.all(logits.grad[0][:, ~ignored].abs().sum(0) > 0)


def test_2x3_weighted_cross_entropy_is_the_mean_over_labelled_pixels():
    logits, target, alone_logits, alone_target = _example_2x3()
    weights = torch.full((1, 2, 3), 2.0)
    weights[target == IGNORE] = math.nan  # whatever an ignored pixel's weight, it counts nowhere
    loss = weighted_cross_entropy(logits, target, weights)
    assert loss.item() == pytest.approx(2 * CE_2X3, abs=1e-6)
    alone = weighted_cross_entropy(alone_logits, alone_target, torch.full(alone_target.shape, 2.0))
    assert loss.item() == pytest.approx(alone.item(), abs=1e-6)


def test_3_classes_with_ignore():
    # 1x3 image, K = 3, target (0, 2, IGNORE). Probabilities: pixel 0 (.5, .25, .25), pixel 1 (.25, .25, .5);
    # the ignored pixel is predicted class 1 with high confidence.
    ln2 = math.log(2)
    logits = torch.tensor([[ln2, 0.0, 0.0], [0.0, 0.0, ln2], [0.0, 5.0, 0.0]]).T[None, :, None, :]  # rows: pixels
    target = torch.tensor([[[0, 2, IGNORE]]], dtype=torch.uint8)
    ce = ln2  # both labelled pixels give their true class .5
    # class 0: p = (.5, .25), t = (1, 0): 2 * .5 / (.3125 + 1); class 1: p = (.25, .25), t = 0: eps / (.125 + eps)
    # (the ignored pixel's .8 of class 1 would dominate it); class 2: p = (.25, .5), t = (0, 1): as class 0.
    dice = [(1 + EPS) / (1.3125 + EPS), EPS / (0.125 + EPS), (1 + EPS) / (1.3125 + EPS)]
    expected = ce + 1 - sum(dice) / 3  # 1.185208
    assert expected == pytest.approx(1.185208, abs=1e-6)
    assert ce_dice_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)
    alone = ce_dice_loss(logits[..., :2], target[..., :2])
    assert ce_dice_loss(logits, target).item() == pytest.approx(alone.item(), abs=1e-6)


def test_image_without_labels_is_left_out_of_the_batch():
    logits, target, _, _ = _example_2x3()
    batch_logits = torch.cat([logits, torch.randn(1, 2, 2, 3)])
    batch_target = torch.cat([target, torch.full((1, 2, 3), IGNORE, dtype=torch.uint8)])
    # CE averages over the batch's labelled pixels and the Dice mean over labelled images: the empty image
    # (whose Dice would be eps / eps = 1) must not dilute the Dice term.
    assert ce_dice_loss(batch_logits, batch_target).item() == pytest.approx(LOSS_2X3, abs=1e-6)
    weights = torch.ones(2, 2, 3)
    assert weighted_cross_entropy(batch_logits, batch_target, weights).item() == pytest.approx(CE_2X3, abs=1e-6)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_all_ignored_batch_gives_zero_loss_and_zero_gradient(num_classes):
    target = torch.full((2, 5, 4), IGNORE, dtype=torch.uint8)
    for loss_fn in (lambda x: ce_dice_loss(x, target), lambda x: weighted_cross_entropy(x, target, torch.ones(2, 5, 4))):
        logits = torch.randn(2, num_classes, 5, 4, requires_grad=True)
        loss = loss_fn(logits)
        assert loss.item() == 0.0  # not NaN: F.cross_entropy's mean over no pixel is 0 / 0
        loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))


# Metrics: the labelled pixels (0,0), (0,1), (1,1), (1,2) have truth (1, 0, 1, 0) and cell probability
# (.9, .2, .4, .7); the ignored pixels are predicted cell 1.0 and 0.0.
P_CELL = [[0.9, 0.2, 1.0], [0.0, 0.4, 0.7]]
TRUTH = [[1, 0, IGNORE], [IGNORE, 1, 0]]


def _probs(p_cell):
    p = torch.as_tensor(p_cell, dtype=torch.float32)
    return torch.stack([1 - p, p], dim=-3)


def _alone():
    labelled = np.array(TRUTH) != IGNORE
    return _probs(np.array(P_CELL)[labelled][None]), torch.tensor(np.array(TRUTH)[labelled][None])


def test_metrics_skip_ignored_pixels():
    m = SegmentationMetrics(ignore_index=IGNORE)
    m.update(_probs(P_CELL), torch.tensor(TRUTH, dtype=torch.uint8))
    r = m.compute()
    # Argmax (1, 0, 0, 1) against truth (1, 0, 1, 0): confusion [[1, 1], [1, 1]].
    assert r["dice_membrane"] == pytest.approx(0.5) and r["dice_cell"] == pytest.approx(0.5)
    assert r["iou_membrane"] == pytest.approx(1 / 3) and r["iou_cell"] == pytest.approx(1 / 3)
    assert r["pixel_error"] == pytest.approx(0.5)
    # Soft Dice: cell 2 * 1.3 / (1.5 + 2) = 0.742857; membrane 2 * 1.1 / (1.1 + 2) = 0.709677.
    assert r["dice_nvidia"] == pytest.approx((2.6 / 3.5 + 2.2 / 3.1) / 2, abs=1e-6)
    assert r["num_images"] == 1
    alone = SegmentationMetrics()
    alone.update(*_alone())
    ref = alone.compute()
    for key in ("dice_nvidia", "dice_membrane", "dice_cell", "iou_membrane", "iou_cell", "dice_mean", "iou_mean",
                "pixel_error", "num_images"):
        assert r[key] == pytest.approx(ref[key], abs=1e-6), key


def test_metrics_three_classes_with_ignore():
    names = ("background", "membrane", "mito")
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.dirichlet(np.ones(3), size=(2, 6, 7)).astype(np.float32)).permute(0, 3, 1, 2)
    truth = rng.integers(0, 3, (2, 6, 7))
    truth[rng.random(truth.shape) < 0.6] = IGNORE
    m = SegmentationMetrics(3, names, ignore_index=IGNORE)
    m.update(probs, torch.from_numpy(truth))
    labelled = truth != IGNORE
    alone = SegmentationMetrics(3, names)
    for i in range(2):  # each image's labelled pixels as a 1xn image
        alone.update(probs[i][:, torch.from_numpy(labelled[i])][:, None], torch.from_numpy(truth[i][labelled[i]][None]))
    r, ref = m.compute(), alone.compute()
    for key in [f"{s}_{n}" for s in ("dice", "iou") for n in names] + ["dice_nvidia", "pixel_error"]:
        assert r[key] == pytest.approx(ref[key], abs=1e-6), key


def test_image_without_labels_counts_nowhere():
    m = SegmentationMetrics(ignore_index=IGNORE)
    m.update(_probs(P_CELL), torch.tensor(TRUTH))
    before = m.compute()
    m.update(_probs(np.full((2, 3), 0.3)), torch.full((2, 3), IGNORE))
    after = m.compute()
    assert after["num_images"] == 1
    for key in before:
        assert (math.isnan(before[key]) and math.isnan(after[key])) or after[key] == before[key], key


def _cells(shape=(12, 12)):
    """Two true cells parted by a membrane column; the prediction merges them (so V_Rand < 1)."""
    truth = np.ones(shape, dtype=np.int64)
    truth[:, 6] = 0
    truth[0, :] = truth[-1, :] = 0
    pred = (truth > 0).astype(np.float32)
    pred[5, 6] = 1.0  # a bridge
    return pred, truth


def test_v_rand_v_info_skip_sparse_images():
    pred, truth = _cells()
    dense = SegmentationMetrics(ignore_index=IGNORE)
    dense.update(_probs(pred), torch.from_numpy(truth))
    ref = dense.compute()
    assert ref["v_rand"] < 1 and ref["v_info"] < 1
    # A perfectly predicted but sparse slice: computed over its labelled pixels it would score 1 and lift the
    # mean; it is left out instead, and alone it gives NaN.
    sparse_truth = truth.copy()
    sparse_truth[:, 8:] = IGNORE
    sparse = SegmentationMetrics(ignore_index=IGNORE)
    sparse.update(_probs((truth > 0).astype(np.float32)), torch.from_numpy(sparse_truth))
    assert math.isnan(sparse.compute()["v_rand"]) and math.isnan(sparse.compute()["v_info"])
    both = SegmentationMetrics(ignore_index=IGNORE)
    both.update(torch.stack([_probs(pred), _probs((truth > 0).astype(np.float32))]),
                torch.from_numpy(np.stack([truth, sparse_truth])))
    r = both.compute()
    assert r["v_rand"] == ref["v_rand"] and r["v_info"] == ref["v_info"]
    assert r["num_images"] == 2


def test_without_ignore_index_255_is_refused_not_ignored():
    from unet.errors import UserError
    with pytest.raises(UserError, match="0..1"):
        SegmentationMetrics().update(_probs(P_CELL), torch.tensor(TRUTH))
    with pytest.raises(UserError, match="0..1 or the ignore value 255"):
        SegmentationMetrics(ignore_index=IGNORE).update(_probs(P_CELL), torch.tensor([[1, 0, 7], [0, 1, 0]]))
    with pytest.raises(ValueError):
        SegmentationMetrics(ignore_index=1)


def test_thinned_scores_skip_sparse_slices():
    pred, truth = _cells()
    labelled = np.ones(truth.shape, bool)
    labelled[:, 8:] = False
    acc = ThinnedScores()
    acc.update(pred, truth > 0, labelled=labelled)
    r = acc.compute()
    assert math.isnan(r["v_rand_thinned"]) and r["skipped_sparse"] == 1
    acc.update(pred, truth > 0, labelled=np.ones(truth.shape, bool))
    dense = thinned_slice_scores(pred, truth > 0)
    r = acc.compute()
    assert r["v_rand_curve"] == pytest.approx(dense[:, 0].tolist()) and r["skipped_sparse"] == 1


def test_instance_scores_skip_sparse_slices():
    pred, truth = _cells()
    acc = InstanceScores(lambda p: label_cells(p > 0.5))
    labelled = np.ones(truth.shape, bool)
    labelled[0, 0] = False
    acc.update(pred, truth > 0, labelled=labelled)
    assert math.isnan(acc.compute()["v_rand_instances"])
    acc.update(pred, truth > 0)
    assert acc.compute()["v_rand_instances"] < 1


def test_weight_map_gives_ignored_pixels_no_weight():
    label = np.array([[0, 1, 1, IGNORE], [0, 1, IGNORE, IGNORE]], dtype=np.uint8)
    # 5 labelled pixels, 2 membrane and 3 cell: membrane 5 / (2 * 2) = 5/4, cell 5 / (2 * 3) = 5/6.
    w = class_balance_weights(label)
    assert w.ravel().tolist() == pytest.approx([5 / 4, 5 / 6, 5 / 6, 0, 5 / 4, 5 / 6, 0, 0])
    assert w[label != IGNORE].mean() == pytest.approx(1)
    assert np.all(unet_weight_map(label)[label == IGNORE] == 0)
    # Between two cells the border term would give an ignored pixel weight: it must not.
    two_cells = np.array([[1, 0, IGNORE, 0, 1]] * 3, dtype=np.uint8)
    w = unet_weight_map(two_cells)
    assert w[0, 1] > 1 and np.all(w[:, 2] == 0)
    dense = np.array([[0, 1], [1, 1]], dtype=np.uint8)
    assert class_balance_weights(dense).ravel().tolist() == pytest.approx([2, 2 / 3, 2 / 3, 2 / 3])


def test_evaluation_skips_ignored_pixels_as_the_loss_does():
    # Validation (training) and evaluate.py score through SliceScores: a sparse slice whose labelled pixels are
    # predicted right scores a perfect Dice whatever is predicted on the ignored ones, and its V_Rand / thinned
    # scores, which need dense truth, are left out (NaN) rather than computed on scribbles.
    from types import SimpleNamespace
    from unet.evaluation.slices import SliceScores
    labels = np.zeros((8, 8), np.uint8)
    labels[:, 4:] = 1
    labels[2:6, 2:6] = IGNORE
    truth = np.where(labels == IGNORE, 0, labels)
    probs = torch.zeros(2, 8, 8)
    probs[1] = torch.from_numpy(truth.astype(np.float32))
    probs[1, 2:6, 2:6] = 1 - probs[1, 2:6, 2:6]  # wrong wherever the label is ignored
    probs[0] = 1 - probs[1]
    scores = SliceScores(SimpleNamespace(num_classes=2, class_names=("membrane", "cell")), thinned=True)
    scores.update(probs, labels)
    m, _ = scores.compute()
    assert m["dice_mean"] == 1.0 and m["pixel_error"] == 0.0
    assert np.isnan(m["v_rand_thinned"]) and np.isnan(m["v_rand"])
