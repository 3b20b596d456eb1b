"""Training augmentation: one-shot geometric warp of a tile plus grey-value changes.

Flip, 90-degree rotation, free rotation and the UNet paper's elastic deformation (random displacements
on a coarse 3 x 3 grid, ~10 px std, bicubic-spline interpolated per pixel) are composed into ONE sampling
grid, and the image (bicubic) and label (nearest) are resampled once with ``torch.nn.functional.grid_sample``.
Sampling with ``padding_mode="reflection"`` and ``align_corners=True`` reads outside the slice exactly as
``np.pad(mode="reflect")`` would, so the warp sees an infinitely mirror-padded slice: no padding margin
to compute and no border artefacts, however far rotation and deformation reach.
All randomness comes from the numpy Generator passed in, so a sample is a pure function of its seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torchvision.transforms.v2 import functional as TF

INTERPOLATIONS = ("bilinear", "bicubic")
# --augment-level: everything below, no grey-value changes, or only the lossless flips and quarter turns.
AUGMENT_LEVELS = ("full", "geometric", "flips")


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; a zero (or False) switches that augmentation off.

    Args:
        flip: random horizontal and vertical flips.
        rot90: random multiples of 90 degrees.
        rotate_deg: free rotation, uniform in [-rotate_deg, rotate_deg] degrees.
        elastic_std: std in pixels of the displacements at the coarse grid points (UNet paper: 10).
        elastic_grid: coarse grid points per side (UNet paper: 3).
        brightness: additive offset, uniform in [-brightness, brightness].
        contrast: factor around the tile mean, uniform in [1 - contrast, 1 + contrast].
        gamma: exponent exp(u), u uniform in [-gamma, gamma].
        noise_std, noise_prob: Gaussian noise of std uniform in [0, noise_std], applied with noise_prob.
        blur_sigma, blur_prob: Gaussian blur of sigma uniform in [0.3, blur_sigma], applied with blur_prob.
        interpolation: image resampling, ``bicubic`` (smooth, as in the paper) or ``bilinear``.
    """

    flip: bool = True
    rot90: bool = True
    rotate_deg: float = 180.0
    elastic_std: float = 10.0
    elastic_grid: int = 3
    brightness: float = 0.1
    contrast: float = 0.2
    gamma: float = 0.3
    noise_std: float = 0.03
    noise_prob: float = 0.3
    blur_sigma: float = 1.0
    blur_prob: float = 0.2
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.elastic_grid < 2:
            raise ValueError(f"elastic_grid must be >= 2, got {self.elastic_grid}")

    @classmethod
    def level(cls, name: str) -> "AugmentConfig":
        """The configuration of an :data:`AUGMENT_LEVELS` name (``full`` = the defaults)."""
        if name not in AUGMENT_LEVELS:
            raise ValueError(f"augment level must be one of {AUGMENT_LEVELS}, got {name!r}")
        if name == "full":
            return cls()
        if name == "geometric":
            return cls.geometric_only()
        return cls.geometric_only(rotate_deg=0.0, elastic_std=0.0)

    @classmethod
    def geometric_only(cls, **overrides) -> "AugmentConfig":
        """Flips, rotations and elastic deformation with no grey-value changes."""
        return cls(**{"brightness": 0.0, "contrast": 0.0, "gamma": 0.0, "noise_prob": 0.0, "blur_prob": 0.0,
                      **overrides})


@lru_cache(maxsize=8)
def _upsample_matrix(size: int, points: int) -> torch.Tensor:
    """``(size, points)`` cubic-spline interpolation weights; grid point 0 at pixel 0, last at pixel size-1."""
    # zoom is linear, so zooming the identity gives the interpolation matrix once for all displacements.
    eye = np.eye(points, dtype=np.float64)
    m = ndi.zoom(eye, (size / points, 1), order=3, mode="mirror", grid_mode=False)
    return torch.from_numpy(m[:size].astype(np.float32))


@lru_cache(maxsize=8)
def _tile_offsets(size: int) -> torch.Tensor:
    return torch.arange(size, dtype=torch.float32) - (size - 1) / 2


def random_affine(rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """A random 2 x 2 matrix (acting on (y, x) offsets) composing flips, 90-degree and free rotation."""
    a = np.eye(2)
    if cfg.flip:
        a = np.diag(np.where(rng.random(2) < 0.5, -1.0, 1.0)) @ a
    if cfg.rot90:
        # Exact integer matrices: a quarter turn must not blur anything.
        k = int(rng.integers(4))
        a = np.linalg.matrix_power(np.array([[0.0, -1.0], [1.0, 0.0]]), k) @ a
    if cfg.rotate_deg:
        t = math.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
        a = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]) @ a
    return a


def sampling_grid(rng: np.random.Generator, cfg: AugmentConfig, size: int,
                  center: tuple[float, float], src_shape: tuple[int, int]) -> torch.Tensor:
    """Source coordinates of every tile pixel, normalised for ``grid_sample(align_corners=True)``.

    Args:
        rng: random generator.
        cfg: augmentation (plain crops do not come through here).
        size: tile height and width.
        center: source (y, x) of the tile centre, in pixels of the slice.
        src_shape: slice (height, width).

    Returns:
        ``(1, size, size, 2)`` grid of normalised (x, y).
    """
    r = _tile_offsets(size)
    ry, rx = r[:, None], r[None, :]
    a = random_affine(rng, cfg)
    sy = a[0, 0] * ry + a[0, 1] * rx + center[0]
    sx = a[1, 0] * ry + a[1, 1] * rx + center[1]
    if cfg.elastic_std:
        g = cfg.elastic_grid
        coarse = torch.from_numpy(rng.normal(0.0, cfg.elastic_std, (2, g, g)).astype(np.float32))
        m = _upsample_matrix(size, g)
        sy = sy + m @ coarse[0] @ m.T
        sx = sx + m @ coarse[1] @ m.T
    h, w = src_shape
    gx = sx * (2.0 / max(w - 1, 1)) - 1.0
    gy = sy * (2.0 / max(h - 1, 1)) - 1.0
    return torch.stack([gx, gy], dim=-1)[None]


def warp(image: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample ``(C, H, W)`` at ``grid`` with mirror ("reflect") boundaries; returns ``(C, h, w)``."""
    return F.grid_sample(image[None], grid, mode=mode, padding_mode="reflection", align_corners=True)[0]


def intensity(tile: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Random gamma, contrast, brightness, noise and blur of a [0, 1] tile; result clipped to [0, 1]."""
    x = tile.clamp(0.0, 1.0)
    if cfg.gamma:
        x = x ** float(math.exp(rng.uniform(-cfg.gamma, cfg.gamma)))
    if cfg.contrast:
        mean = x.mean()
        x = (x - mean) * float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)) + mean
    if cfg.brightness:
        x = x + float(rng.uniform(-cfg.brightness, cfg.brightness))
    if cfg.noise_prob and rng.random() < cfg.noise_prob:
        std = rng.uniform(0, cfg.noise_std)
        x = x + torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32)) * float(std)
    if cfg.blur_prob and rng.random() < cfg.blur_prob:
        sigma = float(rng.uniform(0.3, max(cfg.blur_sigma, 0.3)))
        k = 2 * math.ceil(3 * sigma) + 1
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    return x.clamp(0.0, 1.0)
