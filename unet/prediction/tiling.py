"""Whole-slice prediction at native resolution from fixed-size tiles.

* ``valid`` padding (the UNet paper's overlap-tile strategy): the slice is mirror-padded by the network's
  margin and cut into input tiles whose output tiles cover the slice. Tile offsets are multiples of the
  network's pooling alignment ``g`` (the spacing of valid input sizes, 16 for a depth-5 UNet), so that
  every tile computes what one forward pass over the whole mirror-padded slice computes there.
  One catch: NVIDIA's up-sampling (3x3 stride-2 transposed convolution, PyTorch ``padding=1,
  output_padding=1``) misses one input row/column at the bottom/right edge of every level, so the last
  ``g - 1`` output rows/columns of a tile depend on what lies beyond it. Those are discarded wherever a
  neighbouring tile follows (its step is at most ``output - (g - 1)``), and the last tile is always placed
  so that its band lies beyond the slice edge, in the mirror padding (one tile only when its output covers
  the slice *and* the band; otherwise a further aligned tile, or a larger tile where that costs less).
  Result: the stitched output equals one forward pass over the mirror-padded slice spanning the same
  extent (``plan.starts[-1] + plan.output_size``), and no slice pixel comes from a band.
  A geometry may state its defect width as ``edge_band``; a truly valid network has ``edge_band = 0``.
* ``same`` padding: overlapping windows (``overlap`` fraction) blended with a constant or Gaussian weight
  map (as MONAI's ``sliding_window_inference``); edge windows are snapped inside the slice and slices
  smaller than a window are mirror-padded, predicted, then cropped.

This module plans (which tile size, where the tiles go, how many per forward pass); cutting, predicting,
stitching and blending are :mod:`unet.prediction.tiles`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from unet.errors import UserError
from unet.options import fraction, option, positive_float, positive_int

__all__ = ["TilePlan", "TilingOptions", "check_overlap", "check_tile_size", "check_tile_budget", "largest_tile_size",
           "choose_tile_size", "plan_tiles", "slice_plan", "tile_batch_size", "edge_band", "estimate_bytes_per_pixel",
           "DEFAULT_MEMORY_BUDGET_MB", "BLENDS"]

DEFAULT_MEMORY_BUDGET_MB = 2048
BLENDS = ("gaussian", "constant")
GROUP = "whole-slice prediction"


@dataclass(frozen=True)
class TilingOptions:
    """How whole slices are cut into tiles and predicted (MONAI's ``SlidingWindowInferer`` bundles the same).

    The single source of tiling settings (each field defines its flag); used by training's validation,
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
    """'same' windows along one axis; infinite when several are needed but the window has no usable step."""
    if length <= window:
        return 1
    return math.ceil((length - window) / step) + 1 if step > 0 else math.inf


def _valid_starts(length: int, out: int, step: int, align: int, band: int) -> tuple[int, ...] | None:
    """Output-tile offsets of a 'valid' tiling along one axis; None when no usable step exists.

    The last tile sits at the smallest aligned offset that puts its edge band beyond the slice (before this, a
    slice that fitted one tile kept up to ``band`` defective rows inside it); the tiles before it step by
    ``step`` until their clean outputs (``out - band``) reach that offset, so that no gap is left.
    """
    clean = out - band
    if length <= clean:
        return (0,)
    if step <= 0:
        return None
    last = math.ceil((length - clean) / align) * align
    regular = 1 if last <= clean else math.ceil((last - clean) / step) + 1
    # (regular - 1) * step < last always (step <= clean), so the last tile is a new one.
    return tuple(k * step for k in range(regular)) + (last,)


def edge_band(geometry, tile_size: int) -> int:
    """Output rows/columns at the bottom/right of a ``valid`` tile that depend on pixels beyond the tile (0 for
    ``same``)."""
    if geometry.padding != "valid":
        return 0
    band = getattr(geometry, "edge_band", None)
    return _alignment(geometry, tile_size) - 1 if band is None else int(band)


def _steps(geometry, tile_size: int, overlap: float) -> tuple[int, int, int, int]:
    """(output size, step between tiles, alignment, edge band) for a valid ``tile_size``."""
    align = _alignment(geometry, tile_size)
    band = edge_band(geometry, tile_size)
    if geometry.padding == "valid":
        out = geometry.output_size(tile_size)
        clean = out - band
    else:
        out = tile_size
        clean = int(tile_size * (1 - overlap))
    # Aligned steps keep tiles exact; a tile too small for that still works, only less exactly.
    step = clean - clean % align if clean >= align else max(0, clean)
    return out, step, align, band


def _axis_starts(geometry, length: int, out: int, step: int, align: int, band: int) -> tuple[int, ...] | None:
    """Tile offsets along one axis (None: the tile has no usable step); 'same' edge windows snap inside."""
    if geometry.padding == "valid":
        return _valid_starts(length, out, step, align, band)
    n = _count(length, out, step)
    if n == math.inf:
        return None
    if n == 1:
        return (0,)
    return tuple(k * step for k in range(n - 1)) + (length - out,)


def _axis_count(geometry, length: int, out: int, step: int, align: int, band: int) -> float:
    """How many tiles :func:`_axis_starts` places (infinite when it cannot)."""
    found = _axis_starts(geometry, length, out, step, align, band)
    return math.inf if found is None else len(found)


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


def check_tile_budget(geometry, tile_size: int, memory_budget_mb: float | None = None, *,
                      flag: str = "--tile-size") -> None:
    """Refuse a tile whose one forward pass would exceed the memory budget (before any memory is allocated).

    The same estimate (:func:`estimate_bytes_per_pixel`) that :func:`choose_tile_size` and the tile batch
    obey; a tile over it would die in the allocator, or silently use more memory than the budget allows.

    Args:
        geometry: the network's size arithmetic.
        tile_size: the tile size asked for.
        memory_budget_mb: activation memory per forward pass (None: :data:`DEFAULT_MEMORY_BUDGET_MB`).
        flag: the command-line flag that gave ``tile_size``, for the message.

    Raises:
        UserError: naming ``flag``, the budget and the largest allowed tile size.
    """
    bpp = estimate_bytes_per_pixel(geometry)
    need = int(tile_size) ** 2 * bpp
    budget = _budget_bytes(memory_budget_mb)
    if need <= budget:
        return
    largest = largest_tile_size(geometry, memory_budget_mb)
    allowed = (f"the largest tile size allowed for this model is {largest}" if largest is not None
               else "not even the smallest tile of this model fits")
    raise UserError(f"{flag} {tile_size} needs about {need / 2 ** 20:,.0f} MB of activation memory per tile, "
                    f"over the memory budget of {budget / 2 ** 20:g} MB; {allowed} (or leave {flag} out)")


def plan_tiles(height: int, width: int, geometry, tile_size: int, options: TilingOptions | None = None) -> TilePlan:
    """Tile offsets for one slice and a given tile size.

    Args:
        height, width: slice size.
        geometry: the network's size arithmetic (``padding``, ``output_size``, ``valid_input_size``, ...).
        tile_size: input tile size; must be a valid input size.
        options: its ``overlap`` (window overlap fraction for ``same`` padding, in [0, 1); ignored for ``valid``)
            counts here (None: the defaults).

    Returns:
        a :class:`TilePlan`.

    Raises:
        UserError: if ``tile_size`` is not a valid input size or ``overlap`` is out of range.
    """
    overlap = (options or TilingOptions()).overlap
    check_overlap(overlap)
    tile_size = check_tile_size(geometry, tile_size)
    out, step, align, band = _steps(geometry, tile_size, overlap)

    def starts(length: int) -> tuple[int, ...]:
        found = _axis_starts(geometry, length, out, step, align, band)
        if found is None:
            raise UserError(f"tile size {tile_size} is too small to tile a {height}x{width} slice "
                            f"(its output has no pixels beyond the {band}-pixel edge band); use a larger tile")
        return found

    sy, sx = starts(height), starts(width)
    return TilePlan(tile_size, out, len(sy), len(sx), sy, sx)


def _candidate_sizes(height: int, width: int, geometry):
    """Valid tile sizes, ascending, from the smallest up to the first that covers the slice in one tile."""
    longest = max(height, width)
    if geometry.padding == "valid":
        # One tile covers the slice only with its edge band beyond it (see _valid_starts).
        band = edge_band(geometry, geometry.input_size_for_output(longest))
        size, last = geometry.input_size_for_output(1), geometry.input_size_for_output(longest + band)
    else:
        size, last = geometry.valid_input_size(1), geometry.valid_input_size(longest)
    while size <= last:
        yield size
        size = geometry.valid_input_size(size + 1)


def choose_tile_size(height: int, width: int, geometry, options: TilingOptions | None = None, *,
                     bytes_per_pixel_estimate: int | None = None,
                     cost: Callable[[TilePlan], float] | None = None) -> TilePlan:
    """The square tiling of a slice with the least compute whose tile fits the memory budget.

    Compute is estimated as input pixels per tile times number of tiles (convolution FLOPs are
    proportional to it for a fixed network); memory as ``tile_size**2 * bytes_per_pixel_estimate``
    (see :func:`estimate_bytes_per_pixel`). Ties go to the smaller tile. For UNet_Medical (``valid``) a
    512x512 slice becomes one 700x700 tile (516x516 output) rather than four 572x572 tiles.

    Args:
        height, width: slice size.
        geometry: the network's size arithmetic.
        options: its ``memory_budget_mb`` (activation memory allowed for one tile) and ``overlap`` (window
            overlap fraction for ``same`` padding) count here (None: the defaults).
        bytes_per_pixel_estimate: activation bytes per input pixel (default: from ``geometry``).
        cost: the compute of a candidate plan (default: input pixels per tile times tiles); block-wise
            prediction (:mod:`unet.prediction.blocks`) counts the tiles every block computes instead.

    Returns:
        the chosen :class:`TilePlan`.

    Raises:
        UserError: if not even the smallest valid tile fits the budget.
    """
    options = options or TilingOptions()
    overlap = options.overlap
    budget = _budget_bytes(options.memory_budget_mb)
    bpp = estimate_bytes_per_pixel(geometry) if bytes_per_pixel_estimate is None else bytes_per_pixel_estimate
    check_overlap(overlap)
    best, best_cost = None, math.inf
    for size in _candidate_sizes(height, width, geometry):
        if size * size * bpp > budget:
            break
        out, step, align, band = _steps(geometry, size, overlap)
        if cost is None:
            work = (size * size * _axis_count(geometry, height, out, step, align, band)
                    * _axis_count(geometry, width, out, step, align, band))
        elif _axis_count(geometry, max(height, width), out, step, align, band) == math.inf:
            continue  # too small to tile the slice at all
        else:
            work = cost(plan_tiles(height, width, geometry, size, options))
        if work < best_cost:
            best, best_cost = size, work
    if best is None:
        smallest = next(_candidate_sizes(height, width, geometry))
        need = smallest * smallest * bpp / 2 ** 20
        raise UserError(f"memory budget of {budget / 2 ** 20:g} MB is too small: the smallest tile "
                        f"({smallest}x{smallest}) needs about {need:.0f} MB; raise the budget")
    return plan_tiles(height, width, geometry, best, options)


def slice_plan(height: int, width: int, geometry, options: TilingOptions | None = None) -> TilePlan:
    """The tiling a whole-slice prediction uses: ``options.tile_size`` when given, else :func:`choose_tile_size`'s.

    Args:
        height, width: slice size.
        geometry: the network's size arithmetic.
        options: tile size, overlap and memory budget (None: the defaults).

    Returns:
        the :class:`TilePlan`.

    Raises:
        UserError: for a given tile size over the memory budget (:func:`check_tile_budget`) or invalid.
    """
    options = options or TilingOptions()
    if options.tile_size is None:
        return choose_tile_size(height, width, geometry, options)
    check_tile_budget(geometry, options.tile_size, options.memory_budget_mb)
    return plan_tiles(height, width, geometry, options.tile_size, options)


def tile_batch_size(plan: TilePlan, geometry, options: TilingOptions | None = None) -> int:
    """Tiles per predictor call: ``options.tile_batch``, lowered so that the batch fits the memory budget.

    Raises:
        UserError: when the tile batch is < 1.
    """
    options = options or TilingOptions()
    if options.tile_batch < 1:
        raise UserError(f"tile batch must be at least 1, got {options.tile_batch}")
    per_tile = plan.tile_size ** 2 * estimate_bytes_per_pixel(geometry)
    return max(1, min(options.tile_batch, int(_budget_bytes(options.memory_budget_mb) // per_tile)))
