"""ISBI V_Rand / V_Info of cell instances against the true cells: as one call (:func:`score_instances`) and as
an accumulator summable over ranks (:class:`InstanceScores`).

The metrics wing scores instances; it does not make them. The accumulator is handed the function that does
(the evaluation passes :func:`unet.prediction.instances.cell_instances` with its options).

Like the ISBI scores, these need dense truth (the true cells are the truth's connected components): a slice
with unlabelled pixels is skipped when the accumulator is told which pixels are labelled."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from unet.metrics.cells import label_cells
from unet.metrics.segmentation import SummableState, rand_info_scores

__all__ = ["InstanceScores", "score_instances"]


def score_instances(instances: np.ndarray, true_cells: np.ndarray) -> dict[str, float]:
    """ISBI V_Rand / V_Info of instance labels against the true cells, averaged over slices.

    Uses :func:`unet.metrics.segmentation.rand_info_scores` (Fiji's foreground-restricted N^2 scores; instance 0 inside a
    true cell counts as one-pixel segments); the instances are scored as they are, with no thinning and no
    threshold sweep. Slices with no true cell are left out of the means.

    Args:
        instances: ``(N, H, W)`` or ``(H, W)`` labels, 0 = membrane.
        true_cells: boolean (or 0/1) true cell masks of the same shape.

    Returns:
        dict with ``v_rand`` and ``v_info`` (NaN if no slice has true cells).
    """
    instances, true_cells = np.asarray(instances), np.asarray(true_cells)
    if instances.shape != true_cells.shape:
        raise ValueError(f"instances {instances.shape} and truth {true_cells.shape} differ in shape")
    if instances.ndim == 2:
        instances, true_cells = instances[None], true_cells[None]
    acc = InstanceScores()
    for lab, truth in zip(instances, true_cells):
        acc.add(lab, truth)
    scores = acc.compute()
    return {"v_rand": scores["v_rand_instances"], "v_info": scores["v_info_instances"]}


class InstanceScores(SummableState):
    """V_Rand / V_Info of instances accumulated over slices; mergeable across ranks.

    The state is ``[v_rand sum, v_rand count, v_info sum, v_info count]`` (float64), so summing the states of
    several accumulators (an all-reduce) gives exactly the scores of one pass. Each slice is scored as
    :func:`score_instances` scores it (slices with no true cell are left out), and ``compute()`` equals
    ``score_instances(instance_stack(probs, options), truth)`` when ``make_instances`` is
    ``partial(cell_instances, options=options)``.

    Args:
        make_instances: ``(H, W)`` cell probability -> instance labels, for :meth:`update`; None: only
            :meth:`add` (ready-made labels) is used.
    """

    def __init__(self, make_instances: Callable[[np.ndarray], np.ndarray] | None = None):
        self.make_instances = make_instances
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._state = np.zeros(4)

    def update(self, cell_prob: np.ndarray, true_cells: np.ndarray, labelled: np.ndarray | None = None) -> None:
        """Add one slice: ``(H, W)`` cell probability and true cell mask.

        Args:
            labelled: ``(H, W)`` boolean map of the labelled pixels; a slice with an unlabelled pixel is skipped
                (sparse truth draws no cells), before any instances are made. None: all labelled.
        """
        if self.make_instances is None:
            raise ValueError("InstanceScores.update needs make_instances; use add() for ready-made labels")
        if labelled is not None and not np.all(labelled):
            return
        self.add(self.make_instances(cell_prob), true_cells)

    def add(self, instances: np.ndarray, true_cells: np.ndarray) -> None:
        """Add one slice's ready-made ``(H, W)`` instance labels (0 = membrane) and true cell mask."""
        scores = rand_info_scores(label_cells(np.asarray(true_cells) > 0), instances)
        for k, key in enumerate(("v_rand", "v_info")):
            if not math.isnan(scores[key]):
                self._state[2 * k:2 * k + 2] += (scores[key], 1.0)

    def compute(self) -> dict[str, float]:
        """``v_rand_instances`` and ``v_info_instances``: slice means (NaN when no slice had true cells)."""
        s = self._state
        return {"v_rand_instances": float(s[0] / s[1]) if s[1] else math.nan,
                "v_info_instances": float(s[2] / s[3]) if s[3] else math.nan}
