"""Synthetic EM-like slices with exact membrane labels, for smoke runs and tests without real data.

Two styles. ``"cells"`` (the default, the built-in set): each slice has irregular cells (a Voronoi tessellation
of a smoothly warped plane), dark membranes of varying thickness between them, darker organelles inside cells
(labelled cell interior, as in ISBI 2012, or a class of their own with ``classes=3``), per-cell grey levels,
uneven illumination, blur and noise.
``"neuropil"`` (:mod:`unet.data.neuropil`) imitates ISBI-like neuropil: neurites of very different sizes,
extracellular gaps, striped mitochondria, vesicle clusters; made as a pre-training set (docs/training.md).

Pure numpy/scipy: the :class:`~unet.data.datasets.SliceSet` wrapper is :func:`unet.data.datasets.synthetic_dataset`.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from unet.data.neuropil import neuropil_slice
from unet.data.fields import boundary_distance, smooth_noise, warp
from unet.errors import UserError


def _cells_slice(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 image, uint8 membrane label 0/255, bool organelle mask) of one slice."""
    area = height * width
    # ISBI cells are roughly 40-80 px across at 512 x 512; keep a similar density at any size.
    num_cells = max(4, int(area / rng.uniform(1500, 3000)))
    seeds = np.zeros((height, width), dtype=bool)
    seeds[rng.integers(0, height, num_cells), rng.integers(0, width, num_cells)] = True
    # Nearest-seed index of every pixel = Voronoi cells; an id image maps the seed position to its id.
    ids = np.zeros((height, width), dtype=np.int32)
    ids[seeds] = np.arange(1, seeds.sum() + 1)
    _, (iy, ix) = ndi.distance_transform_edt(~seeds, return_indices=True)
    cells = ids[iy, ix]

    # Warping the plane bends the straight Voronoi edges into irregular membranes.
    sigma = max(height, width) / 12
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    amp = rng.uniform(4, 9)
    cells = warp(cells, [yy + amp * smooth_noise(rng, (height, width), sigma),
                         xx + amp * smooth_noise(rng, (height, width), sigma)], order=0)
    dist = boundary_distance(cells)
    thickness = 1.0 + 2.0 * (0.5 + 0.5 * np.tanh(smooth_noise(rng, (height, width), sigma / 2)))
    membrane = dist < thickness
    label = np.where(membrane, 0, 255).astype(np.uint8)

    # Per-cell grey level plus fine texture, then darker organelles away from the membranes.
    cell_grey = rng.uniform(0.55, 0.8, cells.max() + 1).astype(np.float32)
    img = cell_grey[cells] + 0.05 * smooth_noise(rng, (height, width), 1.5)
    blobs = (smooth_noise(rng, (height, width), 3.0) > 1.6) & (dist > thickness + 3)
    img = np.where(blobs, img - rng.uniform(0.2, 0.3), img)
    img = np.where(membrane, rng.uniform(0.12, 0.25) + 0.05 * smooth_noise(rng, (height, width), 2.0), img)

    illumination = 1.0 + rng.uniform(0.1, 0.25) * smooth_noise(rng, (height, width), max(height, width) / 4)
    img = ndi.gaussian_filter(img * illumination, rng.uniform(0.6, 1.2))
    img = img + rng.uniform(0.02, 0.05) * rng.standard_normal((height, width)).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label, blobs


def make_synthetic_em(count: int, height: int, width: int, seed: int = 0,
                      classes: int = 2, style: str = "cells") -> tuple[np.ndarray, np.ndarray]:
    """Deterministic EM-like slices and their exact labels.

    Args:
        count: number of slices.
        height, width: slice size in pixels (at least 16).
        seed: slices depend only on (seed, slice index), so a longer set extends a shorter one.
        classes: 2 = membrane labels (ISBI's convention); 3 = class indices 0 = membrane, 1 = cytoplasm,
            2 = organelle (the same images either way).
        style: ``"cells"`` (even cells, blob organelles) or ``"neuropil"`` (ISBI-like neurites; its organelles
            are mitochondria).

    Returns:
        ``(images, labels)``: uint8 ``(count, height, width)`` each; labels 255 = cell interior, 0 = membrane
        (``classes=2``) or the class indices above (``classes=3``).
    """
    if count < 1 or height < 16 or width < 16:
        raise UserError(f"synthetic data needs count >= 1 and a size of at least 16x16, "
                        f"got {count} slices of {width}x{height}")
    if classes not in (2, 3):
        raise UserError(f"synthetic data has 2 classes (membrane, cell) or 3 (membrane, cytoplasm, organelle), "
                        f"not {classes}")
    if style not in STYLES:
        raise UserError(f"synthetic style must be one of {', '.join(STYLES)}, not {style!r}")
    make_slice = STYLES[style]
    images = np.empty((count, height, width), dtype=np.uint8)
    labels = np.empty((count, height, width), dtype=np.uint8)
    for k in range(count):
        images[k], membrane, organelles = make_slice(np.random.default_rng([seed, k]), height, width)
        labels[k] = membrane if classes == 2 else np.where(membrane == 0, 0, np.where(organelles, 2, 1))
    return images, labels


STYLES = {"cells": _cells_slice, "neuropil": neuropil_slice}
