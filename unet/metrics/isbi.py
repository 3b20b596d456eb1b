"""The ISBI 2012 challenge's scores: V_Rand and V_Info after border thinning, maximised over thresholds.

This is the protocol of the challenge's Fiji script (trainableSegmentation ``RandError.
getMaximalVRandAfterThinning(0.0, 1.0, 0.1, true)`` and ``VariationOfInformation.
getMaximalVInfoAfterThinning(0.0, 1.0, 0.1)``; Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142):

1. The proposal is a cell probability map (the labels' polarity: high = cell interior). For each threshold
   ``th`` of Fiji's loop ``for (th = 0.0; th <= 1.0; th += 0.1)`` in floating point (0, 0.1, 0.2,
   0.30000000000000004, ..., 0.7999999999999999, 0.8999999999999999, 0.9999999999999999: eleven values,
   the last just below 1), a pixel is cell iff ``value > th``, with the value as Fiji reads it from a
   32-bit float image (rounded to float32) and the comparison in double.
2. Only the proposal is thinned: its membranes are flooded from its 4-connected cells by Fiji's watershed
   (:func:`unet.metrics.fiji_watershed.thin_boundaries`); dam pixels become label 0.
3. The truth is its 4-connected cells; truth label 0 (membrane) is left out (foreground restriction). A
   proposal dam pixel inside a true cell counts as its own one-pixel segment.
4. Each slice gets Fiji's F-scores with N^2 normalisation (see :func:`fiji_slice_scores`); the stack score
   at a threshold is the mean over slices, and the reported score is the maximum over thresholds of
   those means (the first threshold reaching it is returned with it), not the mean of per-slice maxima.

:class:`ThinnedScores` accumulates per-threshold sums as one float64 vector, so ranks combine with an
all-reduce (SUM) exactly like :class:`unet.metrics.segmentation.SegmentationMetrics`.

The protocol needs dense binary truth (its segments are the truth's connected cells). A slice with unlabelled
pixels (sparse labels) is skipped: :meth:`ThinnedScores.update` is told which pixels are labelled, adds
nothing for a slice where some are not, and counts it in ``skipped_sparse``; no dense slice gives NaN.
"""
from __future__ import annotations

import math

import numpy as np

from unet.metrics.fiji_watershed import thin_boundaries
from unet.metrics.cells import label_cells
from unet.metrics.segmentation import SummableState, contingency_counts

__all__ = ["fiji_thresholds", "FIJI_THRESHOLDS", "fiji_slice_scores", "thinned_slice_scores",
           "ThinnedScores", "isbi_thinned_scores"]


def fiji_thresholds(start: float = 0.0, stop: float = 1.0, step: float = 0.1) -> tuple[float, ...]:
    """The thresholds of Fiji's ``for (th = start; th <= stop; th += step)``, with its rounding."""
    out, th = [], start
    while th <= stop:
        out.append(th)
        th += step
    return tuple(out)


FIJI_THRESHOLDS = fiji_thresholds()


def fiji_slice_scores(true_labels: np.ndarray, pred_labels: np.ndarray) -> tuple[float, float]:
    """Fiji's foreground-restricted V_Rand and V_Info F-scores of one slice (N^2 normalisation).

    With ``n_ij`` pixels in true segment i >= 1 and predicted segment j >= 1, ``n0`` true-foreground pixels
    predicted 0 (each its own segment), ``n`` true-foreground pixels, ``a_i`` true segment sizes (n0
    included) and ``b_j = sum_i n_ij``:

    * Rand (``RandError.getForegroundRestrictedRandIndexStatsN2`` + ``ClassificationStatistics``):
      tp = sum n_ij^2 + n0, fp = sum b_j^2 + n0 - tp, fn = sum a_i^2 - tp; precision = tp / (tp + fp)
      (1 when fp = 0), recall = tp / (tp + fn) (1 when fn = 0); V_Rand = 2PR / (P + R), 0 when P + R = 0.
    * Info (``VariationOfInformation.foregroundRestrictedFscore``): entropies in nats of p = count / n,
      a one-pixel segment contributing (1/n) log n; I = H(T) + H(S) - H(T, S); P = I / H(T), R = I / H(S),
      with (P, R) = (0, 1) when H(T) = 0 and (1, 0) when H(S) = 0; V_Info = 2PR / (P + R).

    Fiji's answers for degenerate slices are kept: no true foreground gives V_Rand 0 and V_Info NaN.
    Not reproduced: Fiji stores segment ids as 16-bit, so a slice with more than 65535 segments (pure noise)
    would alias ids there; here ids are exact.

    Args:
        true_labels: ``(H, W)`` true segment ids, 0 = membrane (ignored).
        pred_labels: ``(H, W)`` proposal segment ids, 0 = dam / membrane.

    Returns:
        ``(v_rand, v_info)``.
    """
    t = np.asarray(true_labels).ravel()
    s = np.asarray(pred_labels).ravel()
    if t.shape != s.shape:
        raise ValueError(f"label images differ in size: {np.shape(true_labels)} vs {np.shape(pred_labels)}")
    fg = t > 0
    t, s = t[fg].astype(np.int64), s[fg].astype(np.int64)
    if t.size == 0:
        return 0.0, math.nan
    n, n0, a, b, n_ij = contingency_counts(t, s, singletons=True)
    # float64 sums of squares of counts are exact integers below 2^53 (n <= 2^26 pixels).
    tp = n_ij @ n_ij + n0
    fp = b @ b + n0 - tp
    fn = a @ a - tp
    v_rand = _f_score(1.0 if fp == 0 else tp / (tp + fp), 1.0 if fn == 0 else tp / (tp + fn))
    return v_rand, _info_f_score(a, b, n_ij, n0, n)


def _f_score(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _info_f_score(a: np.ndarray, b: np.ndarray, n_ij: np.ndarray, n0: int, n: int) -> float:
    def plogp(counts: np.ndarray) -> float:
        p = counts / n
        return float((p * np.log(p)).sum())

    singletons = n0 / n * math.log(n)
    h_t = -plogp(a)
    h_s = -plogp(b) + singletons
    h_ts = -plogp(n_ij) + singletons
    mutual = h_t + h_s - h_ts
    if h_s == 0:  # Fiji tests H(S) last, so it wins when both are 0
        precision, recall = 1.0, 0.0
    elif h_t == 0:
        precision, recall = 0.0, 1.0
    else:
        precision, recall = mutual / h_t, mutual / h_s
    # Java's 0 / 0 is NaN (both scores 0: independent partitions); Fiji keeps it.
    return 2 * precision * recall / (precision + recall) if precision + recall != 0 else math.nan


def thinned_slice_scores(cell_prob: np.ndarray, true_cells: np.ndarray,
                         thresholds: tuple[float, ...] = FIJI_THRESHOLDS) -> np.ndarray:
    """Fiji's V_Rand and V_Info of one slice after thinning, at every threshold.

    Args:
        cell_prob: ``(H, W)`` proposal, high = cell (e.g. the cell-class probability).
        true_cells: ``(H, W)`` boolean (or 0/1) true cell-interior mask.
        thresholds: binarisation thresholds; a pixel is cell iff ``cell_prob > th``.

    Returns:
        ``(len(thresholds), 2)`` float64 array of ``(v_rand, v_info)`` per threshold.
    """
    # Fiji reads the proposal as a 32-bit float image and compares each value, widened to double, with the
    # double threshold: round to float32, then compare in float64 (numpy would compare float32 arrays with
    # a Python float in float32, which turns 0.30000000000000004 into 0.3f and flips values equal to 0.3f).
    cell_prob = np.asarray(cell_prob, dtype=np.float32).astype(np.float64)
    true_cells = np.asarray(true_cells)
    if cell_prob.shape != true_cells.shape or cell_prob.ndim != 2:
        raise ValueError(f"expected two (H, W) arrays of one size, got {cell_prob.shape} and {true_cells.shape}")
    true_labels = label_cells(true_cells > 0)
    scores, previous = [], None
    for th in thresholds:
        mask = cell_prob > th
        if previous is None or not np.array_equal(mask, previous):  # a binary proposal: thin it once
            current = fiji_slice_scores(true_labels, thin_boundaries(mask))
        scores.append(current)
        previous = mask
    return np.array(scores)


class ThinnedScores(SummableState):
    """Accumulates per-threshold sums of the thinned scores over slices; mergeable across ranks.

    Example:
        >>> acc = ThinnedScores()
        >>> for prob, truth in slices:
        ...     acc.update(prob[1], truth == 1)     # cell probability, true cell mask
        >>> acc.compute()["v_rand_thinned"]
    """

    def __init__(self, thresholds: tuple[float, ...] = FIJI_THRESHOLDS):
        self.thresholds = tuple(thresholds)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        # Layout: [num_slices | v_rand sum per threshold | v_info sum per threshold | sparse slices skipped]
        self._state = np.zeros(2 + 2 * len(self.thresholds))

    def update(self, cell_prob: np.ndarray, true_cells: np.ndarray, labelled: np.ndarray | None = None) -> None:
        """Add one slice (see :func:`thinned_slice_scores` for the first two arguments).

        Args:
            labelled: ``(H, W)`` boolean map of the labelled pixels (e.g. ``target != IGNORE``); a slice with
                an unlabelled pixel is skipped (counted in ``skipped_sparse``), since ``true_cells`` does not
                describe its cells. None: every pixel is labelled.
        """
        k = len(self.thresholds)
        if labelled is not None and not np.all(labelled):
            self._state[-1] += 1
            return
        scores = thinned_slice_scores(cell_prob, true_cells, self.thresholds)
        self._state[0] += 1
        self._state[1:1 + k] += scores[:, 0]
        self._state[1 + k:1 + 2 * k] += scores[:, 1]

    def compute(self) -> dict:
        """Max over thresholds of the slice means, the threshold that reached it, and the curves.

        Returns:
            dict with ``v_rand_thinned``, ``v_rand_threshold``, ``v_info_thinned``, ``v_info_threshold``
            (floats; NaN when no slice was added), ``v_rand_curve`` / ``v_info_curve`` (lists, one slice
            mean per threshold) and ``skipped_sparse`` (slices left out for unlabelled pixels).
        """
        num, k = self._state[0], len(self.thresholds)
        out: dict = {"skipped_sparse": int(self._state[-1])}
        for name, sums in (("v_rand", self._state[1:1 + k]), ("v_info", self._state[1 + k:1 + 2 * k])):
            if num:
                curve = sums / num
                best, best_th = _fiji_max(curve, self.thresholds)
            else:
                curve, best, best_th = np.full(k, math.nan), math.nan, math.nan
            out[f"{name}_thinned"], out[f"{name}_threshold"] = best, best_th
            out[f"{name}_curve"] = [float(v) for v in curve]
        return out


def _fiji_max(curve: np.ndarray, thresholds: tuple[float, ...]) -> tuple[float, float]:
    """Fiji's ``if (score > best)`` scan from best = 0: the first maximum; NaN never wins; all <= 0 -> (0, th[0])."""
    best, best_th = 0.0, thresholds[0]
    for value, th in zip(curve, thresholds):
        if value > best:
            best, best_th = float(value), th
    return best, best_th


def isbi_thinned_scores(cell_probs: np.ndarray, true_cells: np.ndarray,
                        thresholds: tuple[float, ...] = FIJI_THRESHOLDS) -> dict:
    """The challenge scores of a stack: :class:`ThinnedScores` over ``(N, H, W)`` (or ``(H, W)``) arrays."""
    cell_probs, true_cells = np.asarray(cell_probs), np.asarray(true_cells)
    if cell_probs.ndim == 2:
        cell_probs, true_cells = cell_probs[None], true_cells[None]
    if cell_probs.shape != true_cells.shape:
        raise ValueError(f"proposal {cell_probs.shape} and truth {true_cells.shape} differ in shape")
    acc = ThinnedScores(thresholds)
    for prob, truth in zip(cell_probs, true_cells):
        acc.update(prob, truth)
    return acc.compute()
