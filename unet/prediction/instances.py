"""Cell instances from a cell probability map: a seeded watershed (their ISBI scores: :mod:`unet.metrics.instances`).

A membrane map thresholded into connected components merges every pair of cells joined by one weak
membrane pixel. Here the cells are flooded from seeds instead, so a gap in a membrane no longer merges them:

1. The probability map is Gaussian-smoothed by ``smooth`` px (isolated uncertain pixels would otherwise
   punch holes into cells and seed spurious ones), then ``cells = cell_prob > threshold``.
2. Seeds, one per cell:
   * ``"distance"``: the h-maxima of the Euclidean distance transform of ``cells`` (height
     ``seed_h`` pixels): a neck narrower than the cells on both sides by ``seed_h`` separates two seeds;
   * ``"hminima"`` (default): the h-minima (depth ``seed_h``, in probability units) of the membrane
     probability ``1 - cell_prob`` inside ``cells``.
3. ``skimage.segmentation.watershed`` floods the (smoothed) membrane probability ``1 - cell_prob``
   from the seeds (4-connected), so touching cells are split where the membrane probability is highest
   between them. With ``fill`` (default) the flood covers the whole slice and only the one-pixel watershed
   lines between cells stay 0, a partition like the challenge's thinned proposal; without it the flood
   stays inside ``cells`` and every pixel at or below the threshold stays 0.

Ids run on through a stack (slice k's ids follow slice k-1's), so no two cells of a stack share an id; the
stack is uint16 while the largest id fits, else uint32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima, h_minima
from skimage.segmentation import watershed

from unet.io.writers import label_dtype
from unet.metrics.cells import label_cells
from unet.options import fraction, non_negative_float, option, positive_float

__all__ = ["SEED_METHODS", "InstanceOptions", "cell_instances", "instance_stack"]

SEED_METHODS = ("distance", "hminima")
GROUP = "cell instances (seeded watershed, unet.prediction.instances)"


@dataclass(frozen=True)
class InstanceOptions:
    """Seeded-watershed settings (defaults measured on a stand-in ISBI 2012 prediction, see docs/evaluation.md).

    Attributes:
        threshold: a pixel may belong to a cell iff ``cell_prob > threshold``.
        seeds: ``"distance"`` or ``"hminima"``.
        seed_h: h of the h-maxima (pixels of distance) or h-minima (probability) that make the seeds.
        smooth: Gaussian sigma (px) applied to the probability map first (0 = none).
        fill: flood the membranes too, leaving one-pixel lines (True), or keep the thresholded mask (False).
    """

    threshold: float = option(0.5, "a pixel may belong to a cell iff its cell probability is above this",
                              flags="--instance-threshold", parse=fraction, group=GROUP)
    seeds: str = option("hminima", "seeds: h-minima of the membrane probability, or h-maxima of the distance "
                                   "transform", flags="--instance-seeds", choices=SEED_METHODS, group=GROUP)
    seed_h: float = option(0.2, "h of the seeds' h-minima (probability) or h-maxima (pixels of distance)",
                           flags="--instance-h", parse=positive_float, group=GROUP)
    smooth: float = option(1.0, "Gaussian sigma (px) applied to the probabilities first (0 = none)",
                           flags="--instance-smooth", parse=non_negative_float, group=GROUP)
    fill: bool = option(True, "--no-instance-fill keeps pixels at or below the threshold as membrane (default: "
                              "flood the membranes too, leaving one-pixel lines between cells)",
                        flags="--no-instance-fill", switch="off", group=GROUP)

    def __post_init__(self):
        if self.seeds not in SEED_METHODS:
            raise ValueError(f"seeds must be one of {SEED_METHODS}, got {self.seeds!r}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.seed_h <= 0 or self.smooth < 0:
            raise ValueError(f"seed_h must be > 0 and smooth >= 0, got {self.seed_h} and {self.smooth}")


def cell_instances(cell_prob: np.ndarray, options: InstanceOptions = InstanceOptions()) -> np.ndarray:
    """Label the cells of one slice.

    Args:
        cell_prob: ``(H, W)`` cell probability (high = cell interior).
        options: see :class:`InstanceOptions`.

    Returns:
        ``(H, W)`` int64 labels: 0 = membrane, 1..n = cells.
    """
    cell_prob = np.asarray(cell_prob, dtype=np.float64)
    if cell_prob.ndim != 2:
        raise ValueError(f"cell_prob must be 2-D, got shape {cell_prob.shape}")
    if options.smooth:
        cell_prob = ndimage.gaussian_filter(cell_prob, options.smooth)
    cells = cell_prob > options.threshold
    membrane = 1.0 - cell_prob
    if options.seeds == "distance":
        seeds = h_maxima(ndimage.distance_transform_edt(cells), options.seed_h).astype(bool)
    else:
        seeds = h_minima(membrane, options.seed_h).astype(bool)
    seeds &= cells
    markers = label_cells(seeds)
    # Cells without a seed (h-minima can miss flat ones) keep one by their own component.
    unseeded = label_cells(cells & ~ndimage.binary_propagation(seeds, mask=cells))
    markers[unseeded > 0] = unseeded[unseeded > 0] + markers.max()
    if options.fill:
        lab = watershed(membrane, markers=markers, connectivity=1, watershed_line=True)
    else:
        lab = watershed(membrane, markers=markers, mask=cells, connectivity=1)
    return lab.astype(np.int64)


def instance_stack(cell_probs: np.ndarray, options: InstanceOptions = InstanceOptions()) -> np.ndarray:
    """:func:`cell_instances` of every slice, with ids unique over the stack.

    Args:
        cell_probs: ``(N, H, W)`` cell probabilities.
        options: see :class:`InstanceOptions`.

    Returns:
        ``(N, H, W)`` uint16 (or uint32 above 65535 cells) labels, 0 = membrane.
    """
    cell_probs = np.asarray(cell_probs)
    if cell_probs.ndim != 3:
        raise ValueError(f"cell_probs must be (N, H, W), got shape {cell_probs.shape}")
    out, offset = [], 0
    for prob in cell_probs:
        lab = cell_instances(prob, options)
        out.append(np.where(lab > 0, lab + offset, 0))
        offset += int(lab.max())
    return np.stack(out).astype(label_dtype(offset))
