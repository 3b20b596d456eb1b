"""Cell instances by seeded watershed: exact answers on drawn cells, dtype switch, scoring."""
import functools

import numpy as np
import pytest

from unet.metrics.instances import score_instances
from unet.metrics.cells import label_cells
from unet.io.writers import label_dtype
from unet.prediction.instances import InstanceOptions, cell_instances, instance_stack


# The toys have one-pixel membranes, which a Gaussian pre-smoothing would blur away: no smoothing here.
RAW = InstanceOptions(smooth=0.0)


def _disc(shape, center, radius):
    rr, cc = np.ogrid[:shape[0], :shape[1]]
    return (rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius ** 2


@pytest.mark.parametrize("seeds", ["distance", "hminima"])
def test_two_cells_separated_by_a_membrane_line(seeds):
    prob = np.ones((20, 30))
    prob[:, 14] = 0.0  # one membrane column
    lab = cell_instances(prob, InstanceOptions(seeds=seeds, smooth=0.0))
    assert (lab[:, 14] == 0).all()
    assert len(np.unique(lab[:, :14])) == 1 and len(np.unique(lab[:, 15:])) == 1
    assert lab[0, 0] != lab[0, 29] and lab[0, 0] > 0 and lab[0, 29] > 0
    assert np.unique(lab).tolist() == [0, 1, 2]


def test_touching_pair_is_split_at_the_neck():
    # Two discs of radius 10 whose centres are 16 px apart overlap in a neck: one connected component,
    # two distance maxima (10 each, 6 px of distance at the neck) -> two cells, split at the neck column.
    cells = _disc((30, 50), (15, 17), 10) | _disc((30, 50), (15, 33), 10)
    dist = InstanceOptions(seeds="distance", seed_h=2.0, smooth=0.0)
    lab = cell_instances(cells.astype(float), InstanceOptions(seeds="distance", seed_h=2.0, fill=False, smooth=0.0))
    assert np.unique(lab).tolist() == [0, 1, 2]
    assert (lab[~cells] == 0).all() and (lab[cells] > 0).all()
    assert lab[15, 17] != lab[15, 33]
    # The pair is mirror-symmetric about column 25: each cell keeps its own side.
    assert (lab[:, :25][cells[:, :25]] == lab[15, 17]).all() and (lab[:, 26:][cells[:, 26:]] == lab[15, 33]).all()
    # fill=True floods the background too: everything is one of the two cells except the line at column 25.
    filled = cell_instances(cells.astype(float), dist)
    assert (filled[:, 25] == 0).all() and (filled[:, :25] == lab[15, 17]).all() and (filled[:, 26:] == lab[15, 33]).all()


def test_faint_membrane_splits_a_connected_pair_with_default_hminima_seeds():
    # A 20 x 29 block of cell (p = 1) crossed by a faint 3-px membrane, columns 13-15 (p = 0.6 > threshold
    # 0.5): one connected component. The membrane map has two flat minima (0) behind a 0.4 ridge, still
    # 0.4 * erf(1.5 / sqrt(2)) = 0.35 > h = 0.2 after 1-px smoothing -> two seeds; the line is the middle column.
    prob = np.ones((20, 29))
    prob[:, 13:16] = 0.6
    assert label_cells(prob > 0.5).max() == 1
    lab = cell_instances(prob)
    assert np.unique(lab).tolist() == [0, 1, 2]
    assert (lab[:, 14] == 0).all() and len(np.unique(lab[:, :14])) == 1 and len(np.unique(lab[:, 15:])) == 1
    assert lab[0, 0] != lab[0, 28]


def test_ids_run_on_through_the_stack_and_dtype_switches_above_65535():
    assert label_dtype(65535) is np.uint16 and label_dtype(65536) is np.uint32
    prob = np.ones((2, 20, 30))
    prob[:, :, 14] = 0.0
    stack = instance_stack(prob, RAW)
    assert stack.dtype == np.uint16 and np.unique(stack).tolist() == [0, 1, 2, 3, 4]
    # 260 x 260 one-pixel cells on a 1-pixel membrane grid: 67,600 cells (no distance seed is h = 2 high;
    # every unseeded cell keeps its own id) -> uint32.
    grid = np.zeros((1, 520, 520))
    grid[0, ::2, ::2] = 1.0
    stack = instance_stack(grid, RAW)
    assert stack.dtype == np.uint32 and int(stack.max()) == 67600 and len(np.unique(stack)) == 67601


def test_scores_of_instances():
    prob = np.ones((20, 30))
    prob[:, 14] = 0.0
    truth = prob > 0.5
    assert score_instances(cell_instances(prob, RAW), truth) == {"v_rand": 1.0, "v_info": 1.0}
    merged = np.ones((20, 30), np.int64)  # one instance over both true cells (280 and 300 px):
    # tp = sum a^2 = 280^2 + 300^2 = 168400, sum b^2 = 580^2 = 336400 -> V_Rand = 2 tp / (tp + 336400)
    assert score_instances(merged, truth)["v_rand"] == pytest.approx(336800 / 504800, abs=1e-15)


def test_bad_options():
    with pytest.raises(ValueError, match="seeds"):
        InstanceOptions(seeds="skeleton")
    with pytest.raises(ValueError, match="threshold"):
        InstanceOptions(threshold=1.0)


def test_instance_scores_accumulator_equals_score_instances_and_merges():
    from unet.metrics.instances import InstanceScores
    rng = np.random.default_rng(0)
    probs = np.ones((3, 20, 30))
    probs[:, :, 14] = 0.0
    probs[1, 9, :] = 0.0  # four cells in slice 1
    probs[2] = np.clip(probs[2] - 0.3 * rng.random((20, 30)), 0, 1)
    truth = np.ones((3, 20, 30), bool)
    truth[:, :, 14] = False
    truth[2] = False  # no true cell: left out, as score_instances leaves it out
    expect = score_instances(instance_stack(probs, RAW), truth)
    one = InstanceScores(functools.partial(cell_instances, options=RAW))
    parts = [InstanceScores(functools.partial(cell_instances, options=RAW)) for _ in range(2)]
    for k in range(3):
        one.update(probs[k], truth[k])
        parts[k % 2].update(probs[k], truth[k])
    got = one.compute()
    assert got == {"v_rand_instances": pytest.approx(expect["v_rand"], abs=1e-15),
                   "v_info_instances": pytest.approx(expect["v_info"], abs=1e-15)}
    assert one.state()[[1, 3]].tolist() == [2.0, 2.0]  # slice 2 not counted
    merged = InstanceScores(functools.partial(cell_instances, options=RAW))
    merged.load_state(parts[0].state() + parts[1].state())
    assert merged.compute() == got
    assert InstanceScores().compute()["v_rand_instances"] != InstanceScores().compute()["v_rand_instances"]  # NaN
