"""Neuropil-like synthetic EM slices: the ``style="neuropil"`` of :func:`unet.data.synthetic.make_synthetic_em`.

ISBI 2012 is a serial-section image of *Drosophila* ventral nerve cord: densely packed neurite cross-sections of
very different sizes (thin axons of 10-20 px beside dendrites of 100 px and more at 512 x 512), thick dark
membranes, small extracellular gaps where three or more cells meet, mitochondria with cristae, and clusters of
synaptic vesicles. The ``"cells"`` style (even Voronoi cells, blob organelles) is made for smoke runs and was no
pre-training start for ISBI (docs/training.md); this one imitates the geometry above:

* cells: discs with log-normal radii packed at random (roughly largest first), grown into an *additively
  weighted* Voronoi partition (a pixel belongs to the disc whose rim is nearest), so big and small neurites sit
  side by side as in neuropil, then the plane is warped so boundaries bend;
* membranes: a band of varying width (3-7 px) on every cell boundary, plus the extracellular space (pixels far
  from every disc rim), both labelled membrane as ISBI's annotators did;
* inside cells (labelled cell interior; class 2 = mitochondria with ``classes=3``): striped elliptical
  mitochondria and clusters of small dark-rimmed vesicles;
* per-cell grey levels, fine texture, uneven illumination, blur and noise.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from unet.data.fields import boundary_distance, smooth_noise, warp

# Neurite radii in pixels (log-normal, clipped): median and spread chosen so the membrane share at 512 x 512
# comes out near ISBI's 0.246 (tests/test_data_synthetic.py checks the range).
_RADIUS_MEDIAN, _RADIUS_SIGMA, _RADIUS_MIN, _RADIUS_MAX = 12.0, 0.6, 5.0, 60.0


def _pack_discs(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres (n, 2) and radii (n,) of non-overlapping discs covering the slice (and a margin) densely."""
    margin = _RADIUS_MAX
    span = np.array([height + 2 * margin, width + 2 * margin], dtype=np.float64)
    mean_area = np.pi * _RADIUS_MEDIAN ** 2 * np.exp(2 * _RADIUS_SIGMA ** 2)
    wanted = int(2.5 * span.prod() / mean_area)
    radii = np.clip(rng.lognormal(np.log(_RADIUS_MEDIAN), _RADIUS_SIGMA, wanted), _RADIUS_MIN, _RADIUS_MAX)
    centres = np.empty((len(radii), 2))
    placed = np.empty(len(radii))
    n = 0
    # Largest first packs densely but lays big discs out like a honeycomb; a noisy order keeps it dense and
    # irregular, as neuropil is.
    for r in radii[np.argsort(-radii * rng.lognormal(0, 0.4, len(radii)))]:
        # Vectorised tries: 24 candidate positions at once, the first that clears every placed disc wins.
        cand = rng.random((24, 2)) * span - margin
        gap = rng.uniform(1.0, 3.0)
        d = np.hypot(cand[:, None, 0] - centres[None, :n, 0], cand[:, None, 1] - centres[None, :n, 1])
        ok = np.all(d >= placed[None, :n] + r + gap, axis=1)  # all() of nothing: the first disc always fits
        if not ok.any():
            continue
        centres[n], placed[n] = cand[np.argmax(ok)], r
        n += 1
    return centres[:n], placed[:n]


def _weighted_voronoi(centres: np.ndarray, radii: np.ndarray, height: int,
                      width: int) -> tuple[np.ndarray, np.ndarray]:
    """(cell id 1..n of every pixel, distance from the pixel to the nearest disc rim, negative inside a disc)."""
    best = np.full((height, width), np.inf, dtype=np.float32)
    cells = np.zeros((height, width), dtype=np.int32)
    reach = 3 * _RADIUS_MIN + 24  # a pixel's owner is never farther than this beyond its rim in a dense packing
    for k, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        y0, y1 = max(0, int(cy - r - reach)), min(height, int(cy + r + reach) + 1)
        x0, x1 = max(0, int(cx - r - reach)), min(width, int(cx + r + reach) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        slack = (np.hypot(yy - cy, xx - cx) - r).astype(np.float32)
        win = best[y0:y1, x0:x1]
        closer = slack < win
        win[closer] = slack[closer]
        cells[y0:y1, x0:x1][closer] = k
    if (cells == 0).any():  # a hole wider than `reach`: give it the nearest owned pixel's cell
        _, (iy, ix) = ndi.distance_transform_edt(cells == 0, return_indices=True)
        best = np.where(cells == 0, best[iy, ix], best)
        cells = cells[iy, ix]
    return cells, best


def _mitochondria(rng: np.random.Generator, cells: np.ndarray, inner: np.ndarray,
                  radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bool mask, cristae stripe pattern in [-1, 1]) of elliptical mitochondria inside the larger cells."""
    height, width = cells.shape
    mask = np.zeros((height, width), dtype=bool)
    stripes = np.zeros((height, width), dtype=np.float32)
    for _ in range(int(height * width / rng.uniform(4000, 6000))):
        y, x = rng.integers(0, height), rng.integers(0, width)
        cell = cells[y, x]
        if radii[cell - 1] < 14 or inner[y, x] < 6:
            continue
        a, b = rng.uniform(9, 20), rng.uniform(5, 10)  # semi-axes
        theta = rng.uniform(0, np.pi)
        yy, xx = np.ogrid[max(0, y - 21):min(height, y + 22), max(0, x - 21):min(width, x + 22)]
        u = (xx - x) * np.cos(theta) + (yy - y) * np.sin(theta)
        v = -(xx - x) * np.sin(theta) + (yy - y) * np.cos(theta)
        inside = ((u / a) ** 2 + (v / b) ** 2 <= 1) & (cells[yy, xx] == cell) & (inner[yy, xx] > 2.5)
        mask[yy, xx] |= inside
        stripes[yy, xx] = np.where(inside, np.sin(u * 2 * np.pi / rng.uniform(3.5, 5.0)), stripes[yy, xx])
    return mask, stripes


def _vesicles(rng: np.random.Generator, cells: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Darkening in [0, 1] of clusters of small vesicles (dark rims, lighter centres) inside cells."""
    height, width = cells.shape
    dark = np.zeros((height, width), dtype=np.float32)
    for _ in range(int(height * width / rng.uniform(20000, 40000))):
        y, x = rng.integers(0, height), rng.integers(0, width)
        if inner[y, x] < 10:
            continue
        for _ in range(rng.integers(6, 20)):
            vy, vx = y + rng.normal(0, 6), x + rng.normal(0, 6)
            r = rng.uniform(1.8, 2.8)
            y0, y1 = max(0, int(vy - 4)), min(height, int(vy + 5))
            x0, x1 = max(0, int(vx - 4)), min(width, int(vx + 5))
            if y0 >= y1 or x0 >= x1:
                continue
            yy, xx = np.ogrid[y0:y1, x0:x1]
            rim = np.exp(-((np.hypot(yy - vy, xx - vx) - r) ** 2) / 0.8)
            keep = (cells[y0:y1, x0:x1] == cells[y, x]) & (inner[y0:y1, x0:x1] > 1.5)
            dark[y0:y1, x0:x1] = np.maximum(dark[y0:y1, x0:x1], np.where(keep, rim, 0))
    return dark


def neuropil_slice(rng: np.random.Generator, height: int,
                   width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 image, uint8 membrane label 0/255, bool mitochondria mask) of one neuropil-like slice."""
    centres, radii = _pack_discs(rng, height, width)
    cells, slack = _weighted_voronoi(centres, radii, height, width)

    # Two warps: a broad one bends the layout, a fine one (in pixels, any slice size) rounds the polygons.
    sigma = max(height, width) / 10
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    wide, fine = rng.uniform(3, 7), rng.uniform(2.5, 4.5)
    coords = [yy + wide * smooth_noise(rng, (height, width), sigma) + fine * smooth_noise(rng, (height, width), 10),
            xx + wide * smooth_noise(rng, (height, width), sigma) + fine * smooth_noise(rng, (height, width), 10)]
    cells = warp(cells, coords, order=0)
    slack = warp(slack, coords, order=1)

    inner = boundary_distance(cells)
    thickness = 1.5 + 2.2 / (1 + np.exp(-1.5 * smooth_noise(rng, (height, width), sigma / 3)))
    extracellular = slack > rng.uniform(11, 16)
    membrane = (inner < thickness) | extracellular
    label = np.where(membrane, 0, 255).astype(np.uint8)

    interior = inner - thickness  # depth inside the cell, past the membrane band
    mito, stripes = _mitochondria(rng, cells, interior, radii)
    vesicles = _vesicles(rng, cells, interior)

    # Neighbouring neurites differ little in grey in ISBI; texture (grain and mottling) is strong.
    cell_grey = (rng.uniform(0.6, 0.72) + rng.uniform(-0.06, 0.06, cells.max() + 1)).astype(np.float32)
    img = (cell_grey[cells] + 0.07 * smooth_noise(rng, (height, width), 0.8)
           + 0.04 * smooth_noise(rng, (height, width), 4.0))
    img = img - rng.uniform(0.25, 0.35) * vesicles
    img = np.where(mito, rng.uniform(0.3, 0.42) + 0.08 * stripes, img)
    # The dark line is a soft profile across the labelled band, as a stained membrane blurred by the section.
    depth = rng.uniform(0.45, 0.65) + 0.08 * smooth_noise(rng, (height, width), 6.0)
    img = img * (1 - depth * np.exp(-(inner / (0.8 * thickness)) ** 2))
    img = np.where(extracellular & (inner >= thickness), img - rng.uniform(0.05, 0.15), img)

    illumination = 1.0 + rng.uniform(0.08, 0.2) * smooth_noise(rng, (height, width), max(height, width) / 4)
    img = ndi.gaussian_filter(img * illumination, rng.uniform(0.8, 1.5))
    img = img + rng.uniform(0.02, 0.05) * rng.standard_normal((height, width)).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label, mito & ~membrane
