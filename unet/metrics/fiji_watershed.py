"""Fiji's border thinning: trainableSegmentation's ``WatershedTransform2D`` on a binary image, exactly.

The ISBI 2012 challenge thins a thresholded proposal before scoring it: the membrane pixels (value 255)
are flooded from the 4-connected cell components (value 0) by a Vincent-Soille watershed with
4-connectivity, and the pixels where two floods meet become dams (label 0); every other membrane pixel
joins a cell. It is not a skeletonisation of the membranes.

Fiji floods the membrane level with a FIFO queue. Read as a whole, its rules are:

* the queue starts with every membrane pixel that touches a cell, in Fiji's pixel order (x outer, y inner,
  i.e. column-major for a numpy ``(row, col)`` array); each processed pixel appends its not yet queued
  neighbours in the order left, up, right, down. The queue is therefore breadth-first: layer ``d`` holds
  the membrane pixels at 4-connected geodesic distance ``d`` from the cells;
* a pixel takes the label of its already processed neighbours (cells, earlier layers, and pixels of its
  own layer that were dequeued before it) when they carry exactly one distinct label, and becomes a dam
  (0) when they carry two or more, or only dams.

Pixels of the same layer can be neighbours, so which of two such pixels becomes the dam depends on the
queue order. ``skimage.segmentation.watershed(..., watershed_line=True)`` orders its plateau by a heap and
marks lines by another rule, so its dams differ from Fiji's on a few pixels per slice (see
``benchmarks/isbi_metrics_cost.py``); this module therefore reproduces Fiji's queue. It does it layer by
layer with numpy: the order of layer ``d + 1`` is the order in which layer ``d`` enqueues it, and the
dependence on earlier pixels of the same layer is a DAG, solved by iterating to its unique fixed point
(a few rounds: values only change where two fronts meet).

Degenerate images follow Fiji too: no cell pixel at all -> one segment covering the image (label 1);
no membrane pixel -> the cell components.
"""
from __future__ import annotations

import numpy as np
from skimage.measure import label as label_components

__all__ = ["thin_boundaries"]

_UNSET = -2  # a membrane pixel not processed yet (Fiji's MASK / INQUEUE)


def thin_boundaries(cell_mask: np.ndarray) -> np.ndarray:
    """Thin a binary proposal's membranes to one-pixel dams, as Fiji's ``WatershedTransform2D(binary, 4)``.

    Args:
        cell_mask: ``(H, W)`` boolean array, True where the proposal is cell (Fiji's value 0).

    Returns:
        ``(H, W)`` int32 labels: 1..n for the flooded cells (ids are not Fiji's numbering; only the partition
        matters for scoring), 0 for dam pixels.
    """
    cell_mask = np.asarray(cell_mask, dtype=bool)
    if cell_mask.ndim != 2:
        raise ValueError(f"cell_mask must be 2-D, got shape {cell_mask.shape}")
    h, w = cell_mask.shape
    if not cell_mask.any():
        return np.ones((h, w), np.int32)  # the membrane level is one new minimum
    basins = label_components(cell_mask, connectivity=1).astype(np.int32)
    # One pixel of padding (value -1: neither label nor dam) removes all bounds checks.
    labels = np.full((h + 2, w + 2), -1, np.int32)
    labels[1:-1, 1:-1] = np.where(cell_mask, basins, _UNSET)
    flat = labels.ravel()
    stride = w + 2
    offsets = np.array([-1, -stride, 1, stride])  # Fiji's order: (x-1, y), (x, y-1), (x+1, y), (x, y+1)

    queued = np.zeros(flat.size, bool)
    queued[flat != _UNSET] = True  # cells and padding never enter the queue
    layer = _first_layer(flat, offsets, stride, h, w)
    rank = np.full(flat.size, np.iinfo(np.int64).max, np.int64)  # queue position within the current layer
    while layer.size:
        queued[layer] = True
        rank[layer] = np.arange(layer.size)
        _label_layer(flat, layer, offsets, rank)
        rank[layer] = np.iinfo(np.int64).max
        layer = _next_layer(layer, queued, offsets)
    return labels[1:-1, 1:-1].copy()


def _first_layer(flat: np.ndarray, offsets: np.ndarray, stride: int, h: int, w: int) -> np.ndarray:
    """Membrane pixels touching a cell, in Fiji's column-major order (padded flat indices)."""
    rows, cols = np.nonzero(flat.reshape(h + 2, w + 2) == _UNSET)
    idx = rows * stride + cols
    touches = np.zeros(idx.size, bool)
    for off in offsets:
        touches |= flat[idx + off] > 0
    idx, rows, cols = idx[touches], rows[touches], cols[touches]
    return idx[np.lexsort((rows, cols))]


def _label_layer(flat: np.ndarray, layer: np.ndarray, offsets: np.ndarray, rank: np.ndarray) -> None:
    """Give each pixel of one queue layer its label (or 0) from the neighbours processed before it."""
    nbrs = layer[:, None] + offsets[None, :]
    # A neighbour of the same layer counts only if it was dequeued earlier; later ones are not set yet.
    same = flat[nbrs] == _UNSET
    earlier = same & (rank[nbrs] < np.arange(layer.size)[:, None])
    ignore = same & ~earlier
    flat[layer] = _resolve(flat[nbrs], ignore)
    # Earlier same-layer neighbours were read as unset above; iterate on the pixels that have any.
    dep = earlier.any(1)
    sub, sub_nbrs, sub_ignore = layer[dep], nbrs[dep], ignore[dep]
    while sub.size:
        new = _resolve(flat[sub_nbrs], sub_ignore)
        changed = new != flat[sub]
        if not changed.any():
            break
        flat[sub] = new


def _resolve(values: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """Fiji's rule per row of neighbour values: one distinct label -> it; several, or none -> dam (0)."""
    positive = (values > 0) & ~ignore
    big = np.iinfo(np.int32).max
    hi = np.where(positive, values, -1).max(1)
    lo = np.where(positive, values, big).min(1)
    return np.where(positive.any(1) & (hi == lo), hi, 0).astype(np.int32)


def _next_layer(layer: np.ndarray, queued: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Pixels first enqueued by this layer, in enqueue order (position of the enqueuer, then direction)."""
    cand = (layer[:, None] + offsets[None, :]).ravel()  # row-major: (position, direction) order
    keep = ~queued[cand]
    cand = cand[keep]
    if not cand.size:
        return cand
    uniq, first = np.unique(cand, return_index=True)
    return uniq[np.argsort(first, kind="stable")]
