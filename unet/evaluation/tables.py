"""Metric tables as text: the cross-validation summary (mean and sample std over folds) and its Markdown
table, the aligned metrics table, and :func:`fmt`, the one number formatter of these tables and of the
benchmark tables (benchmarks/common.py). A leaf: numbers in, text out; it imports nothing from the package."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Metrics summarised over cross-validation folds, with the column titles of the Markdown table.
CV_METRICS = {"dice_nvidia": "Dice (NVIDIA)", "dice_mean": "Dice (mean)", "iou_mean": "IoU (mean)",
              "pixel_error": "Pixel error", "v_rand": "V_Rand", "v_info": "V_Info",
              "v_rand_thinned": "V_Rand (thinned)", "v_info_thinned": "V_Info (thinned)",
              "v_rand_instances": "V_Rand (instances)", "v_info_instances": "V_Info (instances)"}
STD_KIND = "sample standard deviation over folds (ddof=1)"


def metric_columns(per_fold: Sequence[dict[str, float]]) -> dict[str, str]:
    """:data:`CV_METRICS`, plus one Dice and one IoU column per class when the folds have more than two classes.

    With K > 2 classes the means over classes hide which class fails; with two, ``dice_nvidia`` and the means
    say enough and the table stays as it always was. Per-class keys are ``dice_<class name>`` /
    ``iou_<class name>`` (:class:`unet.metrics.segmentation.SegmentationMetrics`).
    """
    columns = dict(CV_METRICS)
    names = [k[len("dice_"):] for k in (per_fold[0] if per_fold else {})
             if k.startswith("dice_") and k not in CV_METRICS]
    if len(names) > 2:
        columns.update({f"dice_{n}": f"Dice {n}" for n in names})
        columns.update({f"iou_{n}": f"IoU {n}" for n in names})
    return columns


def cv_summary(per_fold: Sequence[dict[str, float]], keys: Sequence[str] | None = None) -> dict:
    """Mean and sample standard deviation (ddof=1) of metrics over folds.

    Args:
        per_fold: one metrics dict per fold.
        keys: the metrics to summarise (default: :func:`metric_columns`).

    Returns:
        ``{"mean": {key: float}, "std": {key: float}, "std_kind": str, "num_folds": int}`` for the keys
        that every fold has; NaN folds are left out of a metric's mean/std, and the std is NaN with fewer
        than two folds.
    """
    mean, std = {}, {}
    keys = tuple(metric_columns(per_fold)) if keys is None else keys
    for key in [k for k in keys if all(k in f for f in per_fold)]:  # metrics every fold has
        values = np.array([f[key] for f in per_fold], dtype=np.float64)
        values = values[~np.isnan(values)]
        mean[key] = float(values.mean()) if values.size else math.nan
        std[key] = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return {"mean": mean, "std": std, "std_kind": STD_KIND, "num_folds": len(per_fold)}


def cv_markdown(fold_labels: Sequence[str], per_fold: Sequence[dict[str, float]], summary: dict) -> str:
    """A Markdown table: one row per fold, then ``mean ± std`` (like NVIDIA UNet_Medical's README).

    Args:
        fold_labels: the first column of each fold row.
        per_fold: one metrics dict per fold.
        summary: :func:`cv_summary` of ``per_fold``.

    Returns:
        The table as text (no trailing newline).
    """
    columns = metric_columns(per_fold)
    keys = [k for k in columns if k in summary["mean"]]
    lines = ["| Fold | " + " | ".join(columns[k] for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for label, m in zip(fold_labels, per_fold):
        lines.append(f"| {label} | " + " | ".join(fmt(m[k]) for k in keys) + " |")
    lines.append("| mean ± std | " + " | ".join(f"{fmt(summary['mean'][k])} ± {fmt(summary['std'][k])}"
                                                 for k in keys) + " |")
    return "\n".join(lines)


def format_table(metrics: dict[str, float]) -> str:
    """One aligned line per metric, e.g. ``dice_nvidia   0.9123``."""
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v if isinstance(v, int) else fmt(v)}" for k, v in metrics.items())


def fmt(value, spec: str = ".4f", missing: str = "nan") -> str:
    """A table cell: floats with ``spec`` (NaN as ``nan``), None as ``missing``, anything else as ``str``.

    The one number formatter of the metric tables here and of the benchmark tables (benchmarks/common.py).
    """
    if value is None:
        return missing
    if isinstance(value, (float, np.floating)):
        return format(float(value), spec)
    return str(value)
