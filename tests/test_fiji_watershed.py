"""Fiji's border thinning: hand-drawn cases and a step-by-step replay of Fiji's FIFO flood."""
from collections import deque

import numpy as np
import pytest

from unet.metrics.fiji_watershed import thin_boundaries


def _fiji_flood_reference(cell_mask):
    """Slow, literal replay of WatershedTransform2D.apply() on a binary image (cells 0, membrane 255).

    One pixel at a time, with Fiji's states (MASK, INQUEUE, WSHED = 0, labels > 0), its pixel order
    (x outer, y inner), its neighbour order (left, up, right, down) and its global ``flag``.
    """
    h, w = cell_mask.shape
    MASK, INQUEUE, WSHED, INIT = -2, -3, 0, -1
    lab = np.full((h, w), INIT, int)
    order = [(r, c) for c in range(w) for r in range(h)]

    def nbrs(r, c):
        for dr, dc in ((0, -1), (-1, 0), (0, 1), (1, 0)):
            if 0 <= r + dr < h and 0 <= c + dc < w:
                yield r + dr, c + dc

    current, flag = 0, False
    levels = [lv for lv in (True, False) if (cell_mask == lv).any()]  # value 0 (cell) first, then 255
    for lv in levels:
        level = [p for p in order if cell_mask[p] == lv]
        fifo = deque()
        for p in level:
            lab[p] = MASK
            if any(lab[q] >= WSHED for q in nbrs(*p)):
                fifo.append(p)
                lab[p] = INQUEUE
        while fifo:
            p = fifo.popleft()
            for q in nbrs(*p):
                if lab[q] > 0:
                    if lab[p] == INQUEUE or (lab[p] == WSHED and flag):
                        lab[p] = lab[q]
                    elif lab[p] > 0 and lab[p] != lab[q]:
                        lab[p], flag = WSHED, False
                elif lab[q] == WSHED:
                    if lab[p] == INQUEUE:
                        lab[p], flag = WSHED, True
                elif lab[q] == MASK:
                    lab[q] = INQUEUE
                    fifo.append(q)
        for p in level:
            if lab[p] == MASK:
                current += 1
                lab[p] = current
                fifo.append(p)
                while fifo:
                    for q in nbrs(*fifo.popleft()):
                        if lab[q] == MASK:
                            lab[q] = current
                            fifo.append(q)
    lab[lab == INIT] = 0
    return lab


def _same_partition(a, b):
    """Equal dams and a one-to-one map between the labels."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(set(pairs[0])) == len(set(pairs[1])) == pairs.shape[1]


def test_two_cells_with_a_thick_membrane_get_one_dam_column():
    # Columns: A A M M M B B. The flood reaches column 2 from A and column 4 from B in layer 1; column 3
    # (layer 2) sees A on its left and B on its right -> dam.
    mask = np.array([[1, 1, 0, 0, 0, 1, 1]] * 3, bool)
    out = thin_boundaries(mask)
    a, b = out[0, 0], out[0, 6]
    assert a != b and a > 0 and b > 0
    assert (out == np.array([[a, a, a, 0, b, b, b]] * 3)).all()


def test_even_width_membrane_dam_is_the_later_column():
    # A M M B: both membrane columns are layer 1; Fiji dequeues column 1 (x outer) first, so it joins A and
    # column 2 then sees A (column 1) and B -> column 2 is the dam.
    mask = np.array([[1, 0, 0, 1]] * 2, bool)
    out = thin_boundaries(mask)
    assert (out[:, 1] == out[:, 0]).all() and (out[:, 2] == 0).all() and (out[:, 3] > 0).all()


def test_degenerate_images():
    assert (thin_boundaries(np.zeros((3, 4), bool)) == 1).all()  # all membrane: one segment
    assert (thin_boundaries(np.ones((3, 4), bool)) == 1).all()  # all cell
    # A closed membrane ring around nothing is absorbed by the single cell around it: no dam at all.
    mask = np.ones((5, 5), bool)
    mask[2, 2] = False
    assert (thin_boundaries(mask) == 1).all()


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_literal_replay_of_fiji_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(4, 30, size=2)
    # Smoothed noise gives blobs with membranes of every width, as a thresholded probability map does.
    from scipy import ndimage
    field = ndimage.gaussian_filter(rng.random((h, w)), sigma=rng.uniform(0.5, 2.5))
    mask = field > np.quantile(field, rng.uniform(0.2, 0.8))
    ours, ref = thin_boundaries(mask), _fiji_flood_reference(mask)
    assert _same_partition(ours, ref), (mask.astype(int), ours, ref)


def test_matches_the_literal_replay_on_isbi_shapes(isbi_dir):
    # A 192 x 192 crop of a real label slice, blurred (2 px) + noise (0.15) as a stand-in proposal, at the
    # first, a middle and the last of Fiji's thresholds.
    import tifffile
    from scipy import ndimage
    truth = tifffile.imread(isbi_dir / "train-labels.tif")[0, 128:320, 200:392] > 0
    prob = ndimage.gaussian_filter(truth.astype(float), 2) + np.random.default_rng(0).normal(0, 0.15, truth.shape)
    for th in (0.0, 0.5, 0.9999999999999999):
        mask = prob > th
        assert _same_partition(thin_boundaries(mask), _fiji_flood_reference(mask)), th
