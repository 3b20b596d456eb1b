"""Fields both synthetic EM generators (synthetic.py's cells, neuropil.py) build slices from."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed white noise."""
    # Wide kernels are slow; smooth a coarse grid and upsample instead (same look, a fraction of the time).
    factor = max(1, int(sigma // 2))
    coarse = tuple(-(-s // factor) + 1 for s in shape) if factor > 1 else shape
    field = ndi.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), sigma / factor, mode="wrap")
    if factor > 1:
        field = ndi.zoom(field, factor, order=1, grid_mode=False)[:shape[0], :shape[1]]
    return (field - field.mean()) / (field.std() + 1e-8)


def warp(image: np.ndarray, coords: list[np.ndarray], order: int) -> np.ndarray:
    """``image`` sampled at ``coords`` (a smooth displacement of the pixel grid), mirrored at the border."""
    return ndi.map_coordinates(image, coords, order=order, mode="mirror")


def boundary_distance(cells: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the nearest boundary between two cell ids (0 on a boundary pixel)."""
    edge = np.zeros(cells.shape, dtype=bool)
    edge[:-1] |= cells[:-1] != cells[1:]
    edge[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    return ndi.distance_transform_edt(~edge)
