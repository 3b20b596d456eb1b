"""Whole-slice prediction at native resolution from fixed-size tiles.

* ``valid`` padding (the UNet paper's overlap-tile strategy): the slice is mirror-padded by the network's
  margin and cut into input tiles whose output tiles cover the slice. Tile offsets are multiples of the
  network's pooling alignment ``g`` (the spacing of valid input sizes, 16 for a depth-5 UNet), so that
  every tile computes what one forward pass over the whole mirror-padded slice computes there.
  One catch: NVIDIA's up-sampling (3x3 stride-2 transposed convolution, PyTorch ``padding=1,
  output_padding=1``) misses one input row/column at the bottom/right edge of every level, so the last
  ``g - 1`` output rows/columns of a tile depend on what lies beyond it. Those are discarded wherever a
  neighbouring tile follows (its step is at most ``output - (g - 1)``) and the last tile is pushed past
  the slice edge when that costs no extra tile. Result: the stitched output equals one forward pass over
  the mirror-padded slice spanning the same extent (``plan.starts[-1] + plan.output_size``).
  A geometry may state its defect width as ``edge_band``; a truly valid network has ``edge_band = 0``.
* ``same`` padding: overlapping windows (``overlap`` fraction) blended with a constant or Gaussian weight
  map (as MONAI's ``sliding_window_inference``); edge windows are snapped inside the slice and slices
  smaller than a window are mirror-padded, predicted, then cropped.

Tiling never applies an activation: pass e.g. ``lambda x: model(x).softmax(1)`` as the predictor.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from unet.errors import UserError
from unet.options import fraction, option, positive_float, positive_int

__all__ = ["TilePlan", "TilingOptions", "SliceTiles", "check_overlap", "check_tile_size", "check_tile_budget",
           "largest_tile_size", "choose_tile_size", "plan_tiles", "slice_plan", "predict_slice", "predict_tiles",
           "tile_batch_size", "mirror_pad", "estimate_bytes_per_pixel", "DEFAULT_MEMORY_BUDGET_MB"]

DEFAULT_MEMORY_BUDGET_MB = 2048
BLENDS = ("gaussian", "constant")
GROUP = "whole-slice prediction"


@dataclass(frozen=True)
class TilingOptions:
    """How whole slices are cut into tiles and predicted (MONAI's ``SlidingWindowInferer`` bundles the same).

    Built from the command line by :func:`unet.cli.common.tiling_options`; used by training's validation,
    evaluation and inference alike.

    Attributes:
        tile_size: input tile size; None = the tiling with the fewest FLOPs that fits ``memory_budget_mb``.
        tile_batch: tiles per forward pass (lowered to fit the memory budget).
        overlap: window overlap fraction for ``same`` padding, in [0, 1); ``valid`` tiles never overlap.
        blend: ``gaussian`` or ``constant`` weights for overlapping ``same`` windows.
        tta: average the 8 flips/90-degree rotations of every tile.
        memory_budget_mb: activation memory per forward pass (None: :data:`DEFAULT_MEMORY_BUDGET_MB`).
    """

    tile_size: int | None = option(None, "input tile size (default: the tiling with the fewest FLOPs that fits "
                                         "memory)", name="tile_size", parse=int, group=GROUP)
    tile_batch: int = option(4, "tiles per forward pass", name="tile_batch", parse=positive_int, group=GROUP)
    overlap: float = option(0.25, "window overlap fraction for 'same'-padding models ('valid' tiles never "
                                  "overlap)", name="overlap", parse=fraction, group=GROUP)
    blend: str = option("gaussian", "weight map for overlapping windows ('same' padding)", name="blend",
                        choices=BLENDS, group=GROUP)
    tta: bool = option(False, "test-time augmentation: average the 8 flips/rotations (8x the compute)", name="tta",
                       switch="on", group=GROUP)
    memory_budget_mb: float | None = option(
        None, "activation memory per forward pass in float32 MB (default: half the device's free memory, doubled "
              "under 16-bit autocast)", name="memory_budget_mb", parse=positive_float, group="speed")


@dataclass(frozen=True)
class TilePlan:
    """How a slice is cut into square tiles.

    Attributes:
        tile_size: input tile height = width.
        output_size: output tile height = width (``tile_size`` for ``same`` padding).
        tiles_y, tiles_x: number of tiles along height and width.
        starts_y, starts_x: tile offsets (``valid``: of the output tiles in slice coordinates, i.e. of the
            input tiles in the mirror-padded slice; ``same``: of the windows in the (padded) slice).
    """

    tile_size: int
    output_size: int
    tiles_y: int
    tiles_x: int
    starts_y: tuple[int, ...] = field(default=(), repr=False, compare=False)
    starts_x: tuple[int, ...] = field(default=(), repr=False, compare=False)

    @property
    def num_tiles(self) -> int:
        return self.tiles_y * self.tiles_x

    def __str__(self) -> str:
        return (f"{self.tiles_y} x {self.tiles_x} tiles of {self.tile_size}x{self.tile_size} "
                f"(output {self.output_size}x{self.output_size})")


def estimate_bytes_per_pixel(geometry) -> int:
    """Estimated peak activation memory of one forward pass, in bytes per input pixel.

    Float32, no autograd. Measured peaks for UNet_Medical (64 filters, H200, cuDNN): ``valid`` 1118, 1267
    and 1412 bytes per input pixel for 572, 700 and 876 tiles; ``same`` 2081 for 512 and 1024 tiles.
    The estimate, ``32 * base_filters`` (valid) or ``48 * base_filters`` (same), keeps ~1.5x headroom
    for convolution workspaces and allocator slack. Geometries without ``config.base_filters`` are
    assumed to have 64.

    Args:
        geometry: the network (its ``padding`` and ``config.base_filters`` are read).

    Returns:
        bytes per input pixel of one tile.
    """
    base = getattr(getattr(geometry, "config", None), "base_filters", 64)
    return (32 if geometry.padding == "valid" else 48) * int(base)


def _budget_bytes(memory_budget_mb: float | None) -> float:
    """Activation memory allowed per predictor call, in bytes (None: :data:`DEFAULT_MEMORY_BUDGET_MB`)."""
    return (DEFAULT_MEMORY_BUDGET_MB if memory_budget_mb is None else memory_budget_mb) * 2 ** 20


def _alignment(geometry, tile_size: int) -> int:
    """Spacing of valid input sizes: shifting a tile by a multiple of it keeps the pooling grid aligned."""
    return geometry.valid_input_size(tile_size + 1) - tile_size


def _count(length: int, window: int, step: int) -> float:
    """Tiles along one axis; infinite when several are needed but the tile has no usable step."""
    if length <= window:
        return 1
    return math.ceil((length - window) / step) + 1 if step > 0 else math.inf


def _edge_band(geometry, tile_size: int) -> int:
    """Output rows/columns at the bottom/right of a ``valid`` tile that depend on pixels beyond the tile."""
    if geometry.padding != "valid":
        return 0
    band = getattr(geometry, "edge_band", None)
    return _alignment(geometry, tile_size) - 1 if band is None else int(band)


def _steps(geometry, tile_size: int, overlap: float) -> tuple[int, int, int, int]:
    """(output size, step between tiles, alignment, edge band) for a valid ``tile_size``."""
    align = _alignment(geometry, tile_size)
    band = _edge_band(geometry, tile_size)
    if geometry.padding == "valid":
        out = geometry.output_size(tile_size)
        clean = out - band
    else:
        out = tile_size
        clean = int(tile_size * (1 - overlap))
    # Aligned steps keep tiles exact; a tile too small for that still works, only less exactly.
    step = clean - clean % align if clean >= align else max(0, clean)
    return out, step, align, band


def check_overlap(overlap: float) -> None:
    """Raise UserError unless ``overlap`` is a window overlap fraction in [0, 1)."""
    if not 0 <= overlap < 1:
        raise UserError(f"overlap must be in [0, 1), got {overlap}")


def check_tile_size(geometry, tile_size: int) -> int:
    """``tile_size`` as an int if it is a valid input size of ``geometry``.

    Raises:
        UserError: naming the nearest valid sizes otherwise.
    """
    tile_size = int(tile_size)
    try:
        geometry.output_size(tile_size)
    except ValueError as e:
        raise UserError(f"tile size {tile_size} is not a valid input size for this model: {e}") from None
    if geometry.valid_input_size(tile_size) != tile_size:
        raise UserError(f"tile size {tile_size} is not a valid input size for this model; "
                        f"try {geometry.valid_input_size(tile_size)}")
    return tile_size


def largest_tile_size(geometry, memory_budget_mb: float | None = None) -> int | None:
    """The largest valid input size whose tile fits the memory budget (None if not even the smallest fits).

    Args:
        geometry: the network's size arithmetic (and ``config.base_filters`` for the memory estimate).
        memory_budget_mb: activation memory per forward pass (None: :data:`DEFAULT_MEMORY_BUDGET_MB`).
    """
    limit = math.isqrt(int(_budget_bytes(memory_budget_mb) // estimate_bytes_per_pixel(geometry)))
    size = geometry.input_size_for_output(1) if geometry.padding == "valid" else geometry.valid_input_size(1)
    best = None
    while size <= limit:
        best, size = size, geometry.valid_input_size(size + 1)
    return best


def check_tile_budget(geometry, tile_size: int, memory_budget_mb: float | None = None) -> None:
    """Refuse a tile whose one forward pass would exceed the memory budget (before any memory is allocated).

    The same estimate (:func:`estimate_bytes_per_pixel`) that :func:`choose_tile_size` and the tile batch
    obey; a tile over it would die in the allocator, or silently use more memory than the budget allows.

    Raises:
        UserError: naming --tile-size, the budget and the largest allowed tile size.
    """
    bpp = estimate_bytes_per_pixel(geometry)
    need = int(tile_size) ** 2 * bpp
    budget = _budget_bytes(memory_budget_mb)
    if need <= budget:
        return
    largest = largest_tile_size(geometry, memory_budget_mb)
    allowed = (f"the largest tile size allowed for this model is {largest}" if largest is not None
               else "not even the smallest tile of this model fits")
    raise UserError(f"--tile-size {tile_size} needs about {need / 2 ** 20:,.0f} MB of activation memory per tile, "
                    f"over the memory budget of {budget / 2 ** 20:g} MB; {allowed} (or leave --tile-size out)")


def plan_tiles(height: int, width: int, geometry, tile_size: int, *, overlap: float = 0.25) -> TilePlan:
    """Tile offsets for one slice and a given tile size.

    Args:
        height, width: slice size.
        geometry: the network's size arithmetic (``padding``, ``output_size``, ``valid_input_size``, ...).
        tile_size: input tile size; must be a valid input size.
        overlap: window overlap fraction for ``same`` padding, in [0, 1); ignored for ``valid``.

    Returns:
        a :class:`TilePlan`.

    Raises:
        UserError: if ``tile_size`` is not a valid input size or ``overlap`` is out of range.
    """
    check_overlap(overlap)
    tile_size = check_tile_size(geometry, tile_size)
    out, step, align, band = _steps(geometry, tile_size, overlap)

    def starts(length: int) -> tuple[int, ...]:
        n = _count(length, out, step)
        if n == math.inf:
            raise UserError(f"tile size {tile_size} is too small to tile a {height}x{width} slice "
                            f"(its output has no pixels beyond the {band}-pixel edge band); use a larger tile")
        if n == 1:
            return (0,)
        if geometry.padding == "valid":
            # Last tile: an aligned offset whose output reaches the edge, preferably with its edge band
            # beyond it (in the padding) when that needs no extra tile.
            last = min((n - 1) * step, math.ceil((length - out + band) / align) * align)
        else:
            last = length - out  # snapped inside the slice
        return tuple(k * step for k in range(n - 1)) + (last,)

    sy, sx = starts(height), starts(width)
    return TilePlan(tile_size, out, len(sy), len(sx), sy, sx)


def _candidate_sizes(height: int, width: int, geometry):
    """Valid tile sizes, ascending, from the smallest up to the first that covers the slice in one tile."""
    longest = max(height, width)
    if geometry.padding == "valid":
        size, last = geometry.input_size_for_output(1), geometry.input_size_for_output(longest)
    else:
        size, last = geometry.valid_input_size(1), geometry.valid_input_size(longest)
    while size <= last:
        yield size
        size = geometry.valid_input_size(size + 1)


def choose_tile_size(height: int, width: int, geometry, *, memory_budget_mb: float | None = None,
                     bytes_per_pixel_estimate: int | None = None, overlap: float = 0.25) -> TilePlan:
    """The square tiling of a slice with the least compute whose tile fits the memory budget.

    Compute is estimated as input pixels per tile times number of tiles (convolution FLOPs are
    proportional to it for a fixed network); memory as ``tile_size**2 * bytes_per_pixel_estimate``
    (see :func:`estimate_bytes_per_pixel`). Ties go to the smaller tile. For UNet_Medical (``valid``) a
    512x512 slice becomes one 700x700 tile (516x516 output) rather than four 572x572 tiles.

    Args:
        height, width: slice size.
        geometry: the network's size arithmetic.
        memory_budget_mb: activation memory allowed for one tile (default :data:`DEFAULT_MEMORY_BUDGET_MB`).
        bytes_per_pixel_estimate: activation bytes per input pixel (default: from ``geometry``).
        overlap: window overlap fraction for ``same`` padding.

    Returns:
        the chosen :class:`TilePlan`.

    Raises:
        UserError: if not even the smallest valid tile fits the budget.
    """
    budget = _budget_bytes(memory_budget_mb)
    bpp = estimate_bytes_per_pixel(geometry) if bytes_per_pixel_estimate is None else bytes_per_pixel_estimate
    check_overlap(overlap)
    best, best_cost = None, math.inf
    for size in _candidate_sizes(height, width, geometry):
        if size * size * bpp > budget:
            break
        out, step, _, _ = _steps(geometry, size, overlap)
        cost = size * size * _count(height, out, step) * _count(width, out, step)
        if cost < best_cost:
            best, best_cost = size, cost
    if best is None:
        smallest = next(_candidate_sizes(height, width, geometry))
        need = smallest * smallest * bpp / 2 ** 20
        raise UserError(f"memory budget of {budget / 2 ** 20:g} MB is too small: the smallest tile "
                        f"({smallest}x{smallest}) needs about {need:.0f} MB; raise the budget")
    return plan_tiles(height, width, geometry, best, overlap=overlap)


def slice_plan(height: int, width: int, geometry, *, tile_size: int | None = None, overlap: float = 0.25,
               memory_budget_mb: float | None = None) -> TilePlan:
    """The tiling :func:`predict_slice` uses: ``tile_size`` when given, else :func:`choose_tile_size`'s.

    Raises:
        UserError: for a given ``tile_size`` over the memory budget (:func:`check_tile_budget`) or invalid.
    """
    if tile_size is None:
        return choose_tile_size(height, width, geometry, memory_budget_mb=memory_budget_mb, overlap=overlap)
    check_tile_budget(geometry, tile_size, memory_budget_mb)
    return plan_tiles(height, width, geometry, tile_size, overlap=overlap)


def _reflect_index(n: int, before: int, after: int, device) -> torch.Tensor:
    """Source indices of a reflect padding (edge not repeated) of any width, bouncing as often as needed.

    The numpy twin ``unet.data.sampling._mirror`` is kept on purpose: these indices must live on the
    prediction device for ``index_select``, while the training crops are cut from numpy arrays in loader
    workers, where the torch version is the slower one (572 indices: 11.5 us with torch plus ``.numpy()``
    against 4.1 us with numpy, 1 thread on the 2-core dev machine, 2026-11-26, ``timeit``).
    """
    i = torch.arange(-before, n + after, device=device)
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
def _weight_map(size: int, blend: str, device) -> torch.Tensor:
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
def predict_slice(predictor: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, *,
                  geometry=None, tile_size: int | None = None, tile_batch: int = 4, overlap: float = 0.25,
                  blend: str = "gaussian", tta: bool = False, memory_budget_mb: float | None = None,
                  num_outputs: int | None = None) -> torch.Tensor:
    """Predict a whole slice at native resolution by tiling.

    Args:
        predictor: maps a float batch ``(B, C, t, t)`` to per-pixel outputs ``(B, K, o, o)`` with
            ``o = geometry.output_size(t)``; applied as is (no softmax added).
        image: ``(C, H, W)`` float tensor on any device.
        geometry: size arithmetic (``padding``, ``output_size``, ``valid_input_size``,
            ``input_size_for_output``); defaults to ``predictor`` itself (e.g. a UNet).
        tile_size: input tile size; default :func:`choose_tile_size` (least compute within the budget).
        tile_batch: tiles per predictor call; lowered so that the batch fits ``memory_budget_mb``.
        overlap: window overlap fraction for ``same`` padding (``valid`` tiles do not overlap).
        blend: ``"gaussian"`` or ``"constant"`` weights for overlapping ``same`` windows.
        tta: average over the 8 flips/90-degree rotations of every tile (outputs transformed back).
        memory_budget_mb: activation memory budget per predictor call (default
            :data:`DEFAULT_MEMORY_BUDGET_MB`), estimated with :func:`estimate_bytes_per_pixel`.
        num_outputs: expected ``K``; checked against the predictor's output when given.

    Returns:
        float32 tensor ``(K, H, W)`` on ``image``'s device.

    Raises:
        UserError: for an invalid ``tile_size``, ``overlap``, ``blend`` or ``tile_batch``.
    """
    geometry = _resolve_geometry(predictor, geometry)
    _check_image(image, blend)
    _, height, width = image.shape
    plan = slice_plan(height, width, geometry, tile_size=tile_size, overlap=overlap,
                      memory_budget_mb=memory_budget_mb)
    batch_size = tile_batch_size(plan, geometry, tile_batch, memory_budget_mb)
    tiles = SliceTiles(image, plan, geometry, blend=blend, num_outputs=num_outputs)
    for i in range(0, tiles.num_tiles, batch_size):
        batch = tiles.tiles(i, i + batch_size)
        tiles.add(i, predict_tiles(predictor, batch, tta))
    return tiles.result()


def tile_batch_size(plan: TilePlan, geometry, tile_batch: int, memory_budget_mb: float | None) -> int:
    """Tiles per predictor call: ``tile_batch``, lowered so that the batch fits the memory budget.

    Raises:
        UserError: when ``tile_batch`` < 1.
    """
    if tile_batch < 1:
        raise UserError(f"tile batch must be at least 1, got {tile_batch}")
    per_tile = plan.tile_size ** 2 * estimate_bytes_per_pixel(geometry)
    return max(1, min(tile_batch, int(_budget_bytes(memory_budget_mb) // per_tile)))


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
        blend: weights for overlapping ``same`` windows.
        num_outputs: expected channels of the predictions, or None.
    """

    def __init__(self, image: torch.Tensor, plan: TilePlan, geometry, *, blend: str = "gaussian",
                 num_outputs: int | None = None):
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
        self.weights = None if geometry.padding == "valid" else _weight_map(plan.tile_size, blend, device)
        self.band = _edge_band(geometry, plan.tile_size)
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
