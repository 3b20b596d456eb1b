"""The UNet paper's pixel weight map (Ronneberger et al. 2015, eq. 2) from a membrane label slice.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

* ``w_c`` balances the classes: a pixel of class c weighs ``n / (K * n_c)`` (n pixels, n_c of class c, K the
  number of classes present in the slice), so each present class carries the same total weight and the
  mean of ``w_c`` over the slice is 1 (the paper does not say which balancing it used; this is the
  ``n / (K n_c)`` rule of scikit-learn's "balanced" class weights).
* ``d1``, ``d2``: Euclidean distances from the pixel to the nearest and the second-nearest cell (4-connected
  components of the cell class), measured to the cells' pixels. The border term is added on membrane
  pixels only (the separating borders the paper wants learnt); it is 0 where fewer than two cells exist.
* Ignored pixels (:data:`unet.data.labels.IGNORE`, sparse labels) weigh 0, are no class in ``w_c`` (the
  balance is over the labelled pixels, whose mean weight is 1) and are no cell for the distances.

Speed: one Euclidean distance transform per cell, each on the cell's bounding box grown by ``reach``
pixels (default ``8 * sigma``), not on the whole slice. A pixel further than ``reach`` from a cell gets no
distance to it; that can only drop border terms with ``d1 + d2 > reach``, i.e. smaller than
``w0 * exp(-reach^2 / (2 sigma^2))`` (1.3e-13 for the defaults).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from unet.data.labels import IGNORE
from unet.metrics.cells import label_cells

__all__ = ["class_balance_weights", "border_weight_map", "unet_weight_map", "weight_map_stack"]


def class_balance_weights(classes: np.ndarray) -> np.ndarray:
    """``w_c``: each labelled pixel weighs ``n / (K * n_class)``, K = number of classes present, n = labelled pixels.

    Args:
        classes: ``(H, W)`` non-negative integer class indices, or :data:`IGNORE` (weight 0).

    Returns:
        ``(H, W)`` float64 weights with mean 1 over the labelled pixels.
    """
    classes = np.asarray(classes)
    labelled = classes != IGNORE
    counts = np.bincount(classes[labelled].astype(np.int64))
    present = np.count_nonzero(counts)
    per_class = np.zeros(max(counts.size, IGNORE + 1))  # IGNORE keeps weight 0
    per_class[:counts.size][counts > 0] = np.count_nonzero(labelled) / (present * counts[counts > 0])
    return per_class[classes]


def border_weight_map(cells: np.ndarray, w0: float = 10.0, sigma: float = 5.0,
                      reach: float | None = None) -> np.ndarray:
    """The border term ``w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` on the membrane pixels, 0 on cells.

    Args:
        cells: ``(H, W)`` boolean cell-interior mask (its 4-connected components are the cells).
        w0: border weight.
        sigma: border width in pixels.
        reach: distance window around each cell (default ``8 * sigma``); see the module docstring.

    Returns:
        ``(H, W)`` float64 border weights.
    """
    cells = np.asarray(cells, dtype=bool)
    reach = 8 * sigma if reach is None else reach
    labels = label_cells(cells)
    d1 = np.full(cells.shape, np.inf)
    d2 = np.full(cells.shape, np.inf)
    r = int(np.ceil(reach))
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        # Grow the bounding box by `reach`, clipped to the slice, and measure distances to cell i there.
        window = tuple(slice(max(s.start - r, 0), min(s.stop + r, n)) for s, n in zip(box, cells.shape))
        d = ndimage.distance_transform_edt(labels[window] != i)
        w1, w2 = d1[window], d2[window]  # views: updated in place
        np.minimum(w2, np.maximum(w1, d), out=w2)
        np.minimum(w1, d, out=w1)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma ** 2))  # exp(-inf) = 0 where d2 is unknown
    border[cells] = 0.0
    return border


def unet_weight_map(label: np.ndarray, w0: float = 10.0, sigma: float = 5.0, cell_class: int = 1) -> np.ndarray:
    """The full map ``w = w_c + border`` of one label slice.

    Args:
        label: ``(H, W)`` class indices (0 = membrane, 1 = cell for ISBI), or :data:`IGNORE` (weight 0).
        w0, sigma: the paper's border weight and width (10, 5 px).
        cell_class: the class whose 4-connected components are the cells.

    Returns:
        ``(H, W)`` float32 weights.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be a 2-D slice, got shape {label.shape}")
    weights = class_balance_weights(label) + border_weight_map(label == cell_class, w0, sigma)
    weights[label == IGNORE] = 0.0
    return weights.astype(np.float32)


def weight_map_stack(labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0, cell_class: int = 1) -> np.ndarray:
    """:func:`unet_weight_map` of every slice of an ``(N, H, W)`` label stack: ``(N, H, W)`` float32."""
    return np.stack([unet_weight_map(lab, w0, sigma, cell_class) for lab in np.asarray(labels)])
