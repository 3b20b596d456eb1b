"""Whole-slice prediction from a tile plan (:mod:`unet.prediction.tiling`): mirror padding, cutting the tiles,
test-time augmentation, and stitching the predicted tiles back (edge-band cropping for ``valid``, blending
for ``same`` windows).

Tiling never applies an activation: pass e.g. ``lambda x: model(x).softmax(1)`` as the predictor.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from unet.errors import UserError
from unet.prediction.tiling import BLENDS, TilePlan, TilingOptions, edge_band, slice_plan, tile_batch_size

__all__ = ["SliceTiles", "mirror_pad", "predict_slice", "predict_tiles", "reflect_positions", "weight_map"]


def _reflect_index(n: int, before: int, after: int, device) -> torch.Tensor:
    """Source indices of a reflect padding (edge not repeated) of any width, bouncing as often as needed.

    The numpy twin ``unet.data.sampling._mirror`` is kept on purpose: these indices must live on the
    prediction device for ``index_select``, while the training crops are cut from numpy arrays in loader
    workers, where the torch version is the slower one (572 indices: 11.5 us with torch plus ``.numpy()``
    against 4.1 us with numpy, 1 thread on the 2-core dev machine, 2026-11-26, ``timeit``).
    """
    return reflect_positions(torch.arange(-before, n + after, device=device), n)


def reflect_positions(i: torch.Tensor, n: int) -> torch.Tensor:
    """The source index, in ``0..n-1``, of each position ``i`` of a reflect-padded axis of length ``n``.

    A block of a slice (:mod:`unet.prediction.blocks`) cuts its part of the mirror-padded slice with this, so
    that its tiles hold exactly the pixels the whole slice's tiles hold.
    """
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Reflect-pad the last two dimensions by any amount (repeated reflection where the pad exceeds the size).

    Identical to ``F.pad(x, (left, right, top, bottom), mode="reflect")`` where that is allowed.

    Args:
        x: tensor ``(..., H, W)``.
        top, bottom, left, right: non-negative pad widths.

    Returns:
        tensor ``(..., H + top + bottom, W + left + right)`` (``x`` itself when every width is 0).
    """
    if min(top, bottom, left, right) < 0:
        raise ValueError(f"pad widths must be non-negative, got {(top, bottom, left, right)}")
    if top == bottom == left == right == 0:
        return x  # nothing to pad ('same' tiles that fit the slice): skip two full-size gathers
    iy = _reflect_index(x.shape[-2], top, bottom, x.device)
    ix = _reflect_index(x.shape[-1], left, right, x.device)
    return x.index_select(-2, iy).index_select(-1, ix)


@functools.lru_cache(maxsize=8)
def weight_map(size: int, blend: str, device) -> torch.Tensor:
    """Blending weights of a window: ones, or a separable Gaussian (sigma = size / 8, as MONAI).

    Cached (read only): a stack's slices all use the same map, and building it is ~10 full-size operations.
    """
    if blend == "constant":
        return torch.ones(size, size, device=device)
    centre = (size - 1) / 2
    sigma = 0.125 * size
    g = torch.exp(-0.5 * ((torch.arange(size, device=device, dtype=torch.float32) - centre) / sigma) ** 2)
    w = g[:, None] * g[None, :]
    # Corners would be ~1e-7: keep every pixel's weight clearly positive so edge pixels stay well defined.
    return (w / w.max()).clamp_min(1e-3)


_DIHEDRAL = [(k, flip) for flip in (False, True) for k in range(4)]


def _tree_sum(xs: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise sum: 8 identical tensors sum to exactly 8x (a running sum would round at 3x)."""
    while len(xs) > 1:
        xs = [xs[i] + xs[i + 1] if i + 1 < len(xs) else xs[i] for i in range(0, len(xs), 2)]
    return xs[0]


def predict_tiles(predictor: Callable, batch: torch.Tensor, tta: bool) -> torch.Tensor:
    """``predictor(batch)`` as float32, or with ``tta`` the mean over the 8 dihedral transforms, mapped back."""
    if not tta:
        return predictor(batch).float()
    outs = []
    for k, flip in _DIHEDRAL:
        x = torch.rot90(batch, k, dims=(-2, -1))
        x = x.flip(-1) if flip else x
        y = predictor(x).float()
        y = y.flip(-1) if flip else y
        outs.append(torch.rot90(y, -k, dims=(-2, -1)))
    return _tree_sum(outs) / len(outs)


def _resolve_geometry(predictor, geometry):
    if geometry is None:
        geometry = predictor
    needed = ("padding", "output_size", "valid_input_size", "input_size_for_output")
    missing = [a for a in needed if not hasattr(geometry, a)]
    if missing:
        raise ValueError(f"geometry lacks {missing}: pass geometry=model when the predictor is a wrapper")
    if geometry.padding not in ("valid", "same"):
        raise ValueError(f"geometry.padding must be 'valid' or 'same', got {geometry.padding!r}")
    return geometry


@torch.no_grad()
def predict_slice(predictor: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                  options: TilingOptions | None = None, *, geometry=None, num_outputs: int | None = None
                  ) -> torch.Tensor:
    """Predict a whole slice at native resolution by tiling.

    Args:
        predictor: maps a float batch ``(B, C, t, t)`` to per-pixel outputs ``(B, K, o, o)`` with
            ``o = geometry.output_size(t)``; applied as is (no softmax added).
        image: ``(C, H, W)`` float tensor on any device.
        options: tile size (default: :func:`~unet.prediction.tiling.choose_tile_size`'s, least compute within
            the budget), tile batch (lowered so that the batch fits the memory budget), overlap and blend of
            ``same`` windows, TTA (the mean over the 8 flips/90-degree rotations of every tile, transformed
            back) and the memory budget per predictor call (None: the defaults of :class:`TilingOptions`).
        geometry: size arithmetic (``padding``, ``output_size``, ``valid_input_size``,
            ``input_size_for_output``); defaults to ``predictor`` itself (e.g. a UNet).
        num_outputs: expected ``K``; checked against the predictor's output when given.

    Returns:
        float32 tensor ``(K, H, W)`` on ``image``'s device.

    Raises:
        UserError: for an invalid tile size, overlap, blend or tile batch.
    """
    options = options or TilingOptions()
    geometry = _resolve_geometry(predictor, geometry)
    _check_image(image, options.blend)
    _, height, width = image.shape
    plan = slice_plan(height, width, geometry, options)
    batch_size = tile_batch_size(plan, geometry, options)
    tiles = SliceTiles(image, plan, geometry, options, num_outputs=num_outputs)
    for i in range(0, tiles.num_tiles, batch_size):
        batch = tiles.tiles(i, i + batch_size)
        tiles.add(i, predict_tiles(predictor, batch, options.tta))
    return tiles.result()


def _check_image(image: torch.Tensor, blend: str) -> None:
    if image.dim() != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float (C, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
    if blend not in BLENDS:
        raise UserError(f"blend must be one of {BLENDS}, got {blend!r}")


class SliceTiles:
    """One slice cut into the tiles of a plan, and the stitcher its predicted tiles go back into.

    :func:`predict_slice` feeds it one batch at a time; a stack predictor (``unet.prediction.pipeline``) may fill
    batches with tiles of several slices. Either way each slice's tiles are cut from the same mirror-padded
    canvas and stitched in the same order, so a slice's result depends only on the tiles' predictions.

    Args:
        image: ``(C, H, W)`` float tensor on any device.
        plan: the slice's :class:`TilePlan`.
        geometry: the network's size arithmetic.
        options: its ``blend`` (weights for overlapping ``same`` windows) counts here (None: the default).
        num_outputs: expected channels of the predictions, or None.
    """

    def __init__(self, image: torch.Tensor, plan: TilePlan, geometry, options: TilingOptions | None = None, *,
                 num_outputs: int | None = None):
        blend = (options or TilingOptions()).blend
        _check_image(image, blend)
        _, self.height, self.width = image.shape
        self.plan = plan
        self.canvas = _canvas(image, plan)
        self.positions = [(y, x) for y in plan.starts_y for x in plan.starts_x]
        self.stitcher = _Stitcher(plan, geometry, blend, image.device, num_outputs)
        self.added = 0

    @property
    def num_tiles(self) -> int:
        return len(self.positions)

    @property
    def done(self) -> bool:
        return self.added == self.num_tiles

    def tiles(self, start: int, stop: int) -> torch.Tensor:
        """Input tiles ``start:stop`` (in plan order) as a ``(n, C, t, t)`` batch."""
        return torch.stack(self.tile_views(start, stop))

    def tile_views(self, start: int, stop: int) -> list[torch.Tensor]:
        """Tiles ``start:stop`` as ``(C, t, t)`` views of the canvas (stack them with other slices' into one batch)."""
        t = self.plan.tile_size
        return [self.canvas[:, y:y + t, x:x + t] for y, x in self.positions[start:stop]]

    def add(self, start: int, pred: torch.Tensor) -> None:
        """Stitch the predictions ``(n, K, o, o)`` of tiles ``start:start + n``; tiles must come in order."""
        if start != self.added:
            raise ValueError(f"tiles must be added in order: expected tile {self.added}, got {start}")
        chunk = self.positions[start:start + pred.shape[0]]
        self.stitcher.add(chunk, pred, (len(chunk), self.canvas.shape[0], self.plan.tile_size, self.plan.tile_size))
        self.added += len(chunk)

    def result(self) -> torch.Tensor:
        """``(K, H, W)`` float32 on the image's device, once every tile was added."""
        if not self.done:
            raise ValueError(f"{self.num_tiles - self.added} of {self.num_tiles} tiles not predicted yet")
        self.canvas = None  # the padded slice is no longer needed; free it before the caller goes on
        return self.stitcher.result()[:, :self.height, :self.width]


def _canvas(image: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """The slice mirror-padded so that every tile of ``plan`` lies inside it."""
    _, height, width = image.shape
    t, o = plan.tile_size, plan.output_size
    if (t - o) % 2:
        raise ValueError(f"geometry shrinks a {t} tile to {o}: an odd total margin cannot be centred")
    margin = (t - o) // 2
    extent_y, extent_x = plan.starts_y[-1] + o, plan.starts_x[-1] + o
    return mirror_pad(image, margin, extent_y - height + margin, margin, extent_x - width + margin)


@functools.lru_cache(maxsize=8)
def _weight_sum(size: int, starts_y: tuple[int, ...], starts_x: tuple[int, ...], weights: torch.Tensor) -> torch.Tensor:
    """Sum of the blending weights of every window of a plan (read only): the same for every slice of a stack,
    so it is summed once, in the order :meth:`_Stitcher.add` visits the windows."""
    norm = torch.zeros(starts_y[-1] + size, starts_x[-1] + size, device=weights.device, dtype=torch.float32)
    for y in starts_y:
        for x in starts_x:
            norm[y:y + size, x:x + size] += weights
    return norm


class _Stitcher:
    """Accumulates predicted output tiles into the slice: edge-band cropping (valid) or blending (same)."""

    def __init__(self, plan: TilePlan, geometry, blend: str, device, num_outputs: int | None):
        self.plan, self.device, self.num_outputs = plan, device, num_outputs
        self.weights = None if geometry.padding == "valid" else weight_map(plan.tile_size, blend, device)
        self.band = edge_band(geometry, plan.tile_size)
        self.out = self.norm = None

    def _allocate(self, k: int) -> None:
        if self.num_outputs is not None and k != self.num_outputs:
            raise ValueError(f"predictor returned {k} channels, expected num_outputs={self.num_outputs}")
        extent = (self.plan.starts_y[-1] + self.plan.output_size, self.plan.starts_x[-1] + self.plan.output_size)
        self.out = torch.zeros(k, *extent, device=self.device, dtype=torch.float32)
        if self.weights is not None:
            self.norm = _weight_sum(self.plan.output_size, self.plan.starts_y, self.plan.starts_x, self.weights)

    def add(self, chunk: list[tuple[int, int]], pred: torch.Tensor, input_shape: tuple[int, ...]) -> None:
        """Place the predictions ``(len(chunk), K, o, o)`` of the tiles at offsets ``chunk``."""
        o = self.plan.output_size
        if pred.dim() != 4 or pred.shape[0] != len(chunk) or pred.shape[-2:] != (o, o):
            raise ValueError(f"predictor returned {tuple(pred.shape)} for input {input_shape}; "
                             f"the geometry expects ({len(chunk)}, K, {o}, {o})")
        if self.out is None:
            self._allocate(pred.shape[1])
        last_y, last_x = self.plan.starts_y[-1], self.plan.starts_x[-1]
        for (y, x), p in zip(chunk, pred.to(self.device)):
            if self.weights is None:
                # Keep the tile's edge band only where no tile follows (see the module docstring).
                h = o - self.band if y != last_y else o
                w = o - self.band if x != last_x else o
                self.out[:, y:y + h, x:x + w] = p[:, :h, :w]
            else:
                self.out[:, y:y + o, x:x + o] += p * self.weights

    def result(self) -> torch.Tensor:
        return self.out if self.norm is None else self.out / self.norm
