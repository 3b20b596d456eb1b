"""unet.prediction.predictor and unet.evaluation (slices, tables) library functions: whole-slice probabilities, sharded metrics, CV summary."""
import json
import math

import numpy as np
import pytest
import torch

from unet.evaluation import slices as evaluation
from unet.evaluation import tables

from unet.prediction import predictor as predict
from unet.data.datasets import SliceSet, load_dataset, synthetic_dataset
from unet.device import setup_device
from unet.distributed import DistInfo
from unet.errors import UserError
from unet.metrics.segmentation import SegmentationMetrics
from unet.model import UNet
from unet.prediction.tiling import TilingOptions

METRIC_KEYS = ("dice_nvidia", "dice_membrane", "dice_cell", "dice_mean", "iou_membrane", "iou_cell",
               "iou_mean", "pixel_error", "v_rand", "v_info", "num_images")


@pytest.fixture(scope="module")
def dev():
    return setup_device("cpu")


@pytest.fixture(scope="module")
def small_set():
    return synthetic_dataset(count=5, size=64, seed=3)


def tiny_model(**kw):
    torch.manual_seed(0)
    return UNet(base_filters=4, depth=3, padding="same", **kw)


def test_predict_probabilities_shape_and_simplex(dev):
    model = tiny_model()
    image = np.random.default_rng(0).random((1, 50, 70), dtype=np.float32)  # not a multiple of anything
    probs = predict.predict_probabilities(model, image, dev, TilingOptions(tile_size=32))
    assert probs.shape == (2, 50, 70) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(0), torch.ones(50, 70), atol=1e-4)


def test_predict_probabilities_turns_dropout_off_and_restores_mode(dev):
    model = tiny_model(dropout=0.9).train()
    image = torch.rand(1, 64, 64)
    a = predict.predict_probabilities(model, image, dev)
    b = predict.predict_probabilities(model, image, dev)
    assert torch.equal(a, b), "dropout must be off during prediction"
    assert model.training, "the caller's train mode must be restored"
    model.eval()
    with torch.inference_mode():
        ref = model(image[None]).softmax(1)[0]
    assert torch.allclose(a, ref, atol=1e-5), "a slice that fits one tile must equal a plain forward pass"


def test_predict_probabilities_rejects_wrong_channels(dev):
    with pytest.raises(UserError, match="expects 3-channel"):
        predict.predict_probabilities(tiny_model(in_channels=3), torch.rand(1, 32, 32), dev)


def test_evaluate_slices_keys_and_ranges(dev, small_set):
    m = evaluation.evaluate_slices(tiny_model(), small_set, dev, options=TilingOptions(tile_size=32))
    assert set(METRIC_KEYS) <= set(m)
    assert m["num_images"] == 5
    for k in METRIC_KEYS[:-1]:
        assert 0.0 <= m[k] <= 1.0, (k, m[k])


def test_evaluate_slices_two_fake_ranks_equal_one_process(dev, small_set, monkeypatch):
    model = tiny_model()
    one, rows = evaluation.evaluate_slices(model, small_set, dev, per_image=True)
    contributions = []
    real_all_reduce = evaluation.all_reduce_sum

    def fake_all_reduce(t, device):
        contributions.append(t.clone())  # what this rank would contribute to the SUM
        return real_all_reduce(t, device)

    monkeypatch.setattr(evaluation, "all_reduce_sum", fake_all_reduce)
    evaluation.evaluate_slices(model, small_set, dev, dist=DistInfo(rank=1, world_size=2))
    rank1 = contributions[-1]
    assert rank1[:, 0].tolist() == [0, 1, 0, 1, 0]  # rank 1 predicted slices 1 and 3 only

    def summed(t, device):  # the SUM over both ranks: rank 1's part plus rank 0's own
        return t + rank1

    monkeypatch.setattr(evaluation, "all_reduce_sum", summed)
    two, rows2 = evaluation.evaluate_slices(model, small_set, dev, dist=DistInfo(rank=0, world_size=2),
                                            per_image=True)
    assert two == one  # bit-identical, not approximately equal
    assert rows2 == rows
    assert [r["index"] for r in rows] == list(range(5)) and rows[0]["name"] == small_set.names[0]
    merged = SegmentationMetrics()
    for r in range(5):
        part = SegmentationMetrics()
        part.update(predict.predict_probabilities(model, small_set.images[r], dev),
                    torch.from_numpy(small_set.labels[r]))
        merged.merge(part)
    assert merged.compute() == pytest.approx(one, rel=1e-12)


def _oracle(slices):
    """A stand-in for predict_probabilities whose probabilities are the one-hot labels."""
    def predict(model, image, dev, options=None):
        i = next(k for k, im in enumerate(slices.images) if im is image)
        lab = torch.from_numpy(slices.labels[i]).long()
        return torch.nn.functional.one_hot(lab, 2).permute(2, 0, 1).float()
    return predict


def test_perfect_predictor_on_isbi_labels(isbi_dir, dev, monkeypatch):
    slices = load_dataset(isbi_dir).subset([0, 7, 29])
    monkeypatch.setattr(evaluation, "predict_probabilities", _oracle(slices))
    m = evaluation.evaluate_slices(tiny_model(), slices, dev)
    assert m["num_images"] == 3
    for k in ("dice_membrane", "dice_cell", "dice_mean", "iou_membrane", "iou_cell", "iou_mean",
              "v_rand", "v_info"):
        assert m[k] == pytest.approx(1.0, abs=1e-12), k
    assert m["pixel_error"] == 0.0
    assert m["dice_nvidia"] == pytest.approx(1.0, abs=1e-6)


def test_evaluate_slices_needs_labels(dev, small_set):
    unlabelled = SliceSet(images=small_set.images, labels=None, names=small_set.names, source="x")
    with pytest.raises(UserError, match="no labels"):
        evaluation.evaluate_slices(tiny_model(), unlabelled, dev)


def test_evaluate_slices_channel_mismatch(dev, small_set):
    with pytest.raises(UserError, match="expects 3-channel images but got 1 channels"):
        evaluation.evaluate_slices(tiny_model(in_channels=3), small_set, dev)


def test_cv_summary_matches_numpy():
    rng = np.random.default_rng(1)
    per_fold = [{k: float(rng.random()) for k in tables.CV_METRICS} for _ in range(5)]
    s = tables.cv_summary(per_fold)
    for k in tables.CV_METRICS:
        v = np.array([f[k] for f in per_fold])
        assert s["mean"][k] == pytest.approx(v.mean(), rel=1e-12)
        assert s["std"][k] == pytest.approx(v.std(ddof=1), rel=1e-12)
    assert "ddof=1" in s["std_kind"] and s["num_folds"] == 5
    table = tables.cv_markdown([str(i) for i in range(5)], per_fold, s)
    lines = table.splitlines()
    assert len(lines) == 2 + 5 + 1 and lines[0].startswith("| Fold | Dice (NVIDIA)")
    assert lines[-1].startswith("| mean ± std | ") and "±" in lines[-1]


def test_cv_summary_single_fold_and_nan():
    s = tables.cv_summary([{k: 0.5 for k in tables.CV_METRICS}])
    assert s["mean"]["v_rand"] == 0.5 and math.isnan(s["std"]["v_rand"])
    s = tables.cv_summary([{**{k: 0.5 for k in tables.CV_METRICS}, "v_info": math.nan},
                               {k: 0.7 for k in tables.CV_METRICS}])
    assert s["mean"]["v_info"] == 0.7  # an undefined fold is left out, not averaged as 0


def test_format_table_is_aligned():
    text = tables.format_table({"dice_nvidia": 0.91234, "v_info": math.nan, "num_images": 6})
    lines = text.splitlines()
    assert len(lines) == 3
    assert len({line.index(line.split()[1]) for line in lines}) == 1
    assert lines[0].endswith("0.9123") and lines[1].endswith("nan") and lines[2].endswith("6")


def test_challenge_and_instance_scores_are_off_by_default_and_exact_across_ranks(dev, small_set, monkeypatch):
    """Training's validation (the default) skips them; asked for, two ranks give the one-process numbers exactly."""
    from unet.prediction.instances import InstanceOptions
    model = tiny_model()
    plain = evaluation.evaluate_slices(model, small_set, dev)
    assert not any(k.endswith(("_thinned", "_instances")) for k in plain) and "thinned_curves" not in plain
    asked = {"thinned": True, "instances": InstanceOptions()}
    one, rows = evaluation.evaluate_slices(model, small_set, dev, per_image=True, **asked)
    for k in ("v_rand_thinned", "v_rand_threshold", "v_info_thinned", "v_info_threshold", "v_rand_instances",
              "v_info_instances"):
        assert k in one and k in rows[0], k
    assert {k: one[k] for k in plain} == plain  # the other metrics are unchanged
    curves = one["thinned_curves"]
    assert max(curves["v_rand"]) == one["v_rand_thinned"] and len(curves["thresholds"]) == 11
    contributions = []
    real_all_reduce = evaluation.all_reduce_sum
    monkeypatch.setattr(evaluation, "all_reduce_sum", lambda t, d: contributions.append(t.clone()) or real_all_reduce(t, d))
    evaluation.evaluate_slices(model, small_set, dev, dist=DistInfo(rank=1, world_size=2), **asked)
    rank1 = contributions[-1]
    monkeypatch.setattr(evaluation, "all_reduce_sum", lambda t, d: t + rank1)
    two, rows2 = evaluation.evaluate_slices(model, small_set, dev, dist=DistInfo(rank=0, world_size=2),
                                            per_image=True, **asked)
    assert json.dumps(two) == json.dumps(one) and json.dumps(rows2) == json.dumps(rows)  # bit-identical, NaN too
