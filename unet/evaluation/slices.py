"""Whole-slice metrics of a model, sharded over ranks: :func:`evaluate_slices` and its accumulator
:class:`SliceScores`.

:func:`~unet.prediction.predictor.predict_probabilities` turns the model and one slice into class
probabilities; :func:`evaluate_slices` shards the slices over ranks and sums the metric accumulators, so every
rank gets exactly the one-process numbers (training's validation and ``evaluate.py`` both come here).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from unet.data.labels import IGNORE
from unet.device import DeviceSetup
from unet.distributed import DistInfo, all_reduce_sum
from unet.errors import UserError
from unet.metrics.instances import InstanceScores
from unet.metrics.isbi import ThinnedScores
from unet.metrics.segmentation import SegmentationMetrics
from unet.prediction.instances import InstanceOptions, cell_instances
from unet.prediction.predictor import predict_probabilities
from unet.prediction.tiling import TilingOptions

THINNED_KEYS = ("v_rand_thinned", "v_rand_threshold", "v_info_thinned", "v_info_threshold")


class SliceScores:
    """All metrics of whole slices as one accumulator whose state is one float64 vector (summable over ranks).

    The state is :class:`~unet.metrics.segmentation.SegmentationMetrics`'s, then (optionally) the challenge's thinned
    scores' (:class:`~unet.metrics.isbi.ThinnedScores`) and the cell-instance scores'
    (:class:`~unet.metrics.instances.InstanceScores`). Both optional parts score the cell class's probability.

    Args:
        config: the model's config (``num_classes``, ``class_names``).
        thinned: also the ISBI challenge's V_Rand / V_Info after thinning, maximised over thresholds.
        instances: also V_Rand / V_Info of the seeded-watershed instances made with these options.
    """

    def __init__(self, config, thinned: bool = False, instances: InstanceOptions | None = None):
        # Pixels labelled IGNORE (sparse annotations) count in no metric, as in the loss.
        self.segmentation = SegmentationMetrics(num_classes=config.num_classes, class_names=tuple(config.class_names),
                                                ignore_index=IGNORE)
        self.cell = self.segmentation.foreground_class
        self.thinned = ThinnedScores() if thinned else None
        self.instances = (InstanceScores(functools.partial(cell_instances, options=instances))
                          if instances is not None else None)
        self._parts = [p for p in (self.thinned, self.instances) if p is not None]
        self.size = self.segmentation.state().numel() + sum(p.state().size for p in self._parts)

    def update(self, probs: torch.Tensor, labels: np.ndarray) -> None:
        """Add one slice: ``(K, H, W)`` probabilities and ``(H, W)`` class indices."""
        labels = np.asarray(labels)
        self.segmentation.update(probs, torch.from_numpy(labels))
        if self._parts:
            cell_prob, true_cells = probs[self.cell].float().cpu().numpy(), labels == self.cell
            for part in self._parts:
                part.update(cell_prob, true_cells, labelled=labels != IGNORE)

    def state(self) -> torch.Tensor:
        return torch.cat([self.segmentation.state()] + [torch.from_numpy(p.state()) for p in self._parts])

    def load_state(self, state: torch.Tensor) -> None:
        n = self.segmentation.state().numel()
        self.segmentation.load_state(state[:n])
        for part in self._parts:
            k = part.state().size
            part.load_state(state[n:n + k].numpy())
            n += k

    def compute(self) -> tuple[dict[str, float], dict | None]:
        """``(metrics, curves)``: the scalar metrics (``num_images`` last) and, with ``thinned``, the
        per-threshold curves ``{"thresholds", "v_rand", "v_info"}`` (else None)."""
        metrics = self.segmentation.compute()
        num_images = metrics.pop("num_images")
        curves = None
        if self.thinned is not None:
            thin = self.thinned.compute()
            metrics.update({k: thin[k] for k in THINNED_KEYS})
            curves = {"thresholds": list(self.thinned.thresholds), "v_rand": thin["v_rand_curve"],
                      "v_info": thin["v_info_curve"]}
        if self.instances is not None:
            metrics.update(self.instances.compute())
        metrics["num_images"] = num_images
        return metrics, curves


def evaluate_slices(model: torch.nn.Module, slices, dev: DeviceSetup, *, dist: DistInfo | None = None,
                    per_image: bool = False, options: TilingOptions | None = None, thinned: bool = False,
                    instances: InstanceOptions | None = None):
    """Metrics of a model over whole labelled slices, sharded over ranks, bit-identical to one process.

    Rank ``r`` of ``W`` predicts slices ``r, r + W, ...``. Each slice's metric state goes into its own row
    of an ``(N, S)`` float64 table that is all-reduced (adding zeros is exact) and then summed in slice
    order, so every rank returns exactly the one-process totals whatever the world size. Under torchrun
    every rank must call this.

    The challenge's thinned scores and the instance scores cost far more than the rest (docs/evaluation.md),
    so they are off unless asked: ``evaluate.py`` asks for both, training's periodic validation for neither.

    Args:
        model: the UNet (unwrapped from DDP) or :class:`~unet.prediction.ensemble.Ensemble` on ``dev.device``; its
            train/eval mode is kept.
        slices: a :class:`~unet.data.datasets.SliceSet` with labels.
        dev: the device setup.
        dist: this process's rank and world size (None: a single process).
        per_image: also return one metrics dict per slice (on every rank, in slice order).
        options: whole-slice tiling options for :func:`~unet.prediction.predictor.predict_probabilities`.
        thinned: add ``v_rand_thinned``, ``v_info_thinned`` and their thresholds (:class:`SliceScores`), and
            the per-threshold curves under ``"thinned_curves"``.
        instances: add ``v_rand_instances``, ``v_info_instances`` of instances made with these options.

    Returns:
        the metrics dict (``SegmentationMetrics.compute()``'s keys, plus those asked for); with
        ``per_image=True`` a tuple ``(metrics, rows)`` where each row has ``index``, ``name`` and that
        slice's scalar metrics.
    """
    dist = dist or DistInfo()
    if slices.labels is None:
        raise UserError(f"{slices.source}: the data has no labels; evaluation needs labels")

    def accumulator() -> SliceScores:
        return SliceScores(model.config, thinned=thinned, instances=instances)

    size = accumulator().size
    table = torch.zeros(len(slices), size, dtype=torch.float64)
    for i in range(dist.rank, len(slices), dist.world_size):
        one = accumulator()
        one.update(predict_probabilities(model, slices.images[i], dev, options), slices.labels[i])
        table[i] = one.state()
    table = all_reduce_sum(table, dev.device)
    total = accumulator()
    total.load_state(_sum_rows(table))
    metrics, curves = total.compute()
    if curves is not None:
        metrics["thinned_curves"] = curves
    if not per_image:
        return metrics
    rows = []
    for i, row in enumerate(table):
        one = accumulator()
        one.load_state(row)
        rows.append({"index": i, "name": slices.names[i], **one.compute()[0]})
    return metrics, rows


def _sum_rows(table: torch.Tensor) -> torch.Tensor:
    """The rows' sum in a fixed order (slice 0, 1, ...): float64 sums independent of the sharding."""
    state = torch.zeros(table.shape[1], dtype=torch.float64)
    for row in table:
        state += row
    return state
