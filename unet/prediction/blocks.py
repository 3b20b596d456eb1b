"""Block-wise prediction with a halo: a slice cut into chunk-aligned blocks, each predicted from its part of the
slice's own tiling (daisy's block task with read and write ROIs; torch-em's ``predict_with_halo``).

A :class:`Block` is one slice's rectangle of whole output chunks (its *write box*; only the volume's edge may
cut a chunk) and the input rectangle its tiles need (its *read box*: the write box plus the halo, clipped to
the slice). Chunk-aligned write boxes are disjoint in chunks, so no two writers ever touch one chunk.

Why the result equals whole-slice prediction: the blocks do not tile on their own. The slice gets one
:class:`~unet.prediction.tiling.TilePlan` (:func:`block_tile_plan`), and a block computes exactly the plan's
tiles whose kept output reaches its write box, cut from the same mirror-padded pixels (the halo is the
``valid`` model's margin, or the rest of the overlapping ``same`` windows; mirror padding only at the slice's
true border, through :func:`unet.prediction.tiles.reflect_positions`), and stitches them in the plan's order
with the slice's rules (edge band cropped except for the last tile, ``same`` windows blended with the slice's
weights summed in the same order). So each pixel of a block is computed from the same tile inputs by the same
arithmetic as :func:`unet.prediction.tiles.predict_slice` computes it: bit-identical when the forward passes
see the same batches (tile batch 1, or blocks that are whole slices, whose tiles are batched in the stack's
order), otherwise within the convolution's batch-size rounding (~1e-7, see docs/inference.md).

The cost: a tile whose output straddles a block border is computed by each block it reaches. The tile size is
therefore chosen for the blocks (:func:`block_tile_plan` counts the tiles every block computes) when the slice
is larger than one block; a slice within one block gets the whole-slice plan unchanged.

Memory: a block holds its read box, its tiles' canvas and its ``(K, block)`` output; at most ``tile batch``
blocks are open at once. Nothing scales with the slice or volume size.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from unet.prediction.tiles import reflect_positions, weight_map
from unet.prediction.tiling import TilePlan, TilingOptions, choose_tile_size, edge_band, slice_plan

__all__ = ["AxisBlock", "Block", "BlockGrid", "BlockTiles", "block_tile_plan", "block_grid", "predict_blocks"]


@dataclass(frozen=True)
class AxisBlock:
    """One block's extent along one axis.

    Attributes:
        start, stop: the written range (chunk-aligned; ``stop`` may be the slice's edge).
        tiles: offsets (the plan's) of the tiles whose kept output reaches ``[start, stop)``, in plan order.
        read_start, read_stop: the input range those tiles read, inside the slice (mirror padding is made
            from it at the border).
    """

    start: int
    stop: int
    tiles: tuple[int, ...]
    read_start: int
    read_stop: int


@dataclass(frozen=True)
class Block:
    """A block task: which slice, what it writes, what it reads.

    Attributes:
        index: position in the volume's block order (z, then y, then x).
        z: the slice.
        y, x: the block's :class:`AxisBlock` along each axis.
    """

    index: int
    z: int
    y: AxisBlock
    x: AxisBlock

    @property
    def write_box(self) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of the output this block writes."""
        return self.y.start, self.y.stop, self.x.start, self.x.stop

    @property
    def read_box(self) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of the input this block reads (write box + halo, inside the slice)."""
        return self.y.read_start, self.y.read_stop, self.x.read_start, self.x.read_stop

    @property
    def num_tiles(self) -> int:
        return len(self.y.tiles) * len(self.x.tiles)


def _kept(start: int, plan_starts: tuple[int, ...], output: int, band: int) -> int:
    """Output rows a tile at ``start`` keeps: all for the last tile, else all but the edge band ('valid')."""
    return output if start == plan_starts[-1] else output - band


def axis_blocks(length: int, block: int, plan_starts: tuple[int, ...], output: int, tile: int,
                band: int) -> list[AxisBlock]:
    """Cut one axis of ``length`` into blocks of ``block`` (the last one shorter) and find each one's tiles.

    Args:
        length: the slice's size along the axis.
        block: the block size (a multiple of the chunk size, or >= ``length``).
        plan_starts: the slice plan's output-tile offsets along the axis.
        output, tile: the plan's output and input tile sizes.
        band: the edge band (0 for 'same').

    Returns:
        The blocks in order.
    """
    margin = (tile - output) // 2
    blocks = []
    for start in range(0, length, block):
        stop = min(start + block, length)
        tiles = tuple(s for s in plan_starts if s < stop and s + _kept(s, plan_starts, output, band) > start)
        # Canvas positions tiles[0] .. tiles[-1] + tile hold image rows shifted by the margin, reflected.
        lo, hi = _reflected_range(tiles[0] - margin, tiles[-1] + tile - margin, length)
        blocks.append(AxisBlock(start, stop, tiles, lo, hi))
    return blocks


def _reflected_range(first: int, last: int, length: int) -> tuple[int, int]:
    """The smallest ``[lo, hi)`` of the slice that positions ``first..last-1`` of its mirror padding read."""
    if first >= 0 and last <= length:
        return first, last
    src = reflect_positions(torch.arange(first, last), length)
    return int(src.min()), int(src.max()) + 1


@dataclass(frozen=True)
class BlockGrid:
    """Every block of a ``(Z, H, W)`` volume: the slice plan and its blocks along y and x (the same for every z).

    Attributes:
        shape: ``(Z, H, W)``.
        block_shape: the y/x block size (whole chunks).
        plan: the slice's tile plan.
        ys, xs: the blocks along y and x.
        band: the plan's edge band (0 for 'same').
    """

    shape: tuple[int, int, int]
    block_shape: tuple[int, int]
    plan: TilePlan
    ys: tuple[AxisBlock, ...]
    xs: tuple[AxisBlock, ...]
    band: int

    @property
    def blocks_per_slice(self) -> int:
        return len(self.ys) * len(self.xs)

    def __len__(self) -> int:
        return self.shape[0] * self.blocks_per_slice

    def block(self, index: int) -> Block:
        """The block at ``index`` (z-major, then y, then x)."""
        z, rest = divmod(index, self.blocks_per_slice)
        by, bx = divmod(rest, len(self.xs))
        return Block(index, z, self.ys[by], self.xs[bx])

    def __iter__(self) -> Iterator[Block]:
        return (self.block(i) for i in range(len(self)))


def block_shape_for(chunks: tuple[int, int], block: tuple[int, int], slice_hw: tuple[int, int]) -> tuple[int, int]:
    """``block`` rounded up to whole ``chunks`` (and to the slice when it is larger than the slice)."""
    return tuple(min(math.ceil(b / c) * c, n) if b < n else n for b, c, n in zip(block, chunks, slice_hw))


def _tiles_per_blocks(length: int, block: int, plan: TilePlan, starts: tuple[int, ...], band: int) -> int:
    return sum(len(b.tiles) for b in axis_blocks(length, block, starts, plan.output_size, plan.tile_size, band))


def block_tile_plan(height: int, width: int, geometry, options: TilingOptions | None,
                    block_shape: tuple[int, int]) -> TilePlan:
    """The slice's tile plan for block-wise prediction.

    A slice within one block, or a given ``tile_size``, gets :func:`~unet.prediction.tiling.slice_plan`'s plan
    (so the result is whole-slice prediction's); otherwise the tile size with the least compute counting every
    tile each block computes (a tile reaching two blocks counts twice).

    Args:
        height, width: the slice size.
        geometry: the network's size arithmetic.
        options: tiling options (None: the defaults).
        block_shape: the y/x block size.

    Returns:
        The :class:`TilePlan`.
    """
    options = options or TilingOptions()
    bh, bw = block_shape
    if options.tile_size is not None or (height <= bh and width <= bw):
        return slice_plan(height, width, geometry, options)

    def cost(plan: TilePlan) -> float:
        band = edge_band(geometry, plan.tile_size)
        return (plan.tile_size ** 2 * _tiles_per_blocks(height, bh, plan, plan.starts_y, band)
                * _tiles_per_blocks(width, bw, plan, plan.starts_x, band))

    return choose_tile_size(height, width, geometry, options, cost=cost)


def block_grid(shape: tuple[int, int, int], block_shape: tuple[int, int], geometry,
               options: TilingOptions | None = None) -> BlockGrid:
    """Plan the blocks of a ``(Z, H, W)`` volume (``block_shape`` already whole chunks, see :func:`block_shape_for`).

    Raises:
        UserError: an invalid tiling (tile size, overlap, budget), as whole-slice prediction raises it.
    """
    _, height, width = shape
    plan = block_tile_plan(height, width, geometry, options, block_shape)
    band = edge_band(geometry, plan.tile_size)
    ys = axis_blocks(height, block_shape[0], plan.starts_y, plan.output_size, plan.tile_size, band)
    xs = axis_blocks(width, block_shape[1], plan.starts_x, plan.output_size, plan.tile_size, band)
    return BlockGrid(tuple(shape), tuple(block_shape), plan, tuple(ys), tuple(xs), band)


def _axis_canvas(axis: AxisBlock, length: int, tile: int, margin: int, device) -> torch.Tensor | slice:
    """Rows (or columns) of the read box that make the block's part of the mirror-padded slice: a plain slice
    inside the slice, reflected indices where the tiles reach past its border."""
    first, last = axis.tiles[0] - margin, axis.tiles[-1] + tile - margin
    if first >= 0 and last <= length:
        return slice(first - axis.read_start, last - axis.read_start)
    return reflect_positions(torch.arange(first, last, device=device), length) - axis.read_start


class BlockTiles:
    """One block's tiles, cut from its read box, and the stitcher of their predictions into its write box.

    Tiles come in plan order and are stitched with the whole slice's rules (see the module docstring).

    Args:
        block: the block.
        grid: its grid (plan, edge band, slice size).
        image: ``(C, rh, rw)`` float tensor: the block's read box of slice ``block.z``.
        weights: the blend weights of ``same`` windows (None for ``valid``).
        num_outputs: expected channels of the predictions, or None.
    """

    def __init__(self, block: Block, grid: BlockGrid, image: torch.Tensor, weights: torch.Tensor | None = None,
                 num_outputs: int | None = None):
        plan = grid.plan
        margin = (plan.tile_size - plan.output_size) // 2
        rows = _axis_canvas(block.y, grid.shape[1], plan.tile_size, margin, image.device)
        cols = _axis_canvas(block.x, grid.shape[2], plan.tile_size, margin, image.device)
        canvas = image[:, rows] if isinstance(rows, slice) else image.index_select(1, rows)
        self.canvas = canvas[:, :, cols] if isinstance(cols, slice) else canvas.index_select(2, cols)
        self.block, self.grid, self.weights, self.num_outputs = block, grid, weights, num_outputs
        self.positions = [(y, x) for y in block.y.tiles for x in block.x.tiles]
        self.taken = self.added = 0
        self.out = self.norm = None

    @property
    def num_tiles(self) -> int:
        return len(self.positions)

    @property
    def done(self) -> bool:
        return self.added == self.num_tiles

    def tile_views(self, start: int, stop: int) -> list[torch.Tensor]:
        """Tiles ``start:stop`` (plan order) as ``(C, t, t)`` views of the block's canvas."""
        t, y0, x0 = self.grid.plan.tile_size, self.block.y.tiles[0], self.block.x.tiles[0]
        return [self.canvas[:, y - y0:y - y0 + t, x - x0:x - x0 + t] for y, x in self.positions[start:stop]]

    def add(self, start: int, pred: torch.Tensor) -> None:
        """Stitch the predictions ``(n, K, o, o)`` of tiles ``start:start + n``; tiles must come in order."""
        if start != self.added:
            raise ValueError(f"tiles must be added in order: expected tile {self.added}, got {start}")
        o = self.grid.plan.output_size
        if pred.dim() != 4 or pred.shape[-2:] != (o, o):
            raise ValueError(f"predictor returned {tuple(pred.shape)}; the geometry expects (n, K, {o}, {o})")
        if self.out is None:
            self._allocate(pred.shape[1], pred.device)
        for (y, x), p in zip(self.positions[start:start + pred.shape[0]], pred):
            self._stitch(y, x, p)
            self.added += 1

    def _allocate(self, k: int, device) -> None:
        if self.num_outputs is not None and k != self.num_outputs:
            raise ValueError(f"predictor returned {k} channels, expected num_outputs={self.num_outputs}")
        y0, y1, x0, x1 = self.block.write_box
        self.out = torch.zeros(k, y1 - y0, x1 - x0, device=device, dtype=torch.float32)
        if self.weights is not None:
            self.norm = torch.zeros(y1 - y0, x1 - x0, device=device, dtype=torch.float32)

    def _stitch(self, y: int, x: int, p: torch.Tensor) -> None:
        """Place one tile's output: the slice's rules, clipped to the write box."""
        plan, band = self.grid.plan, self.grid.band
        o = plan.output_size
        by0, by1, bx0, bx1 = self.block.write_box
        if self.weights is None:  # 'valid': the edge band is dropped where another tile follows
            h, w = _kept(y, plan.starts_y, o, band), _kept(x, plan.starts_x, o, band)
        else:
            h = w = o
        gy0, gy1, gx0, gx1 = max(y, by0), min(y + h, by1), max(x, bx0), min(x + w, bx1)
        if gy0 >= gy1 or gx0 >= gx1:
            return  # never for the tiles axis_blocks chose; kept so that a caller's extra tile is harmless
        src = (slice(gy0 - y, gy1 - y), slice(gx0 - x, gx1 - x))
        dst = (slice(gy0 - by0, gy1 - by0), slice(gx0 - bx0, gx1 - bx0))
        if self.weights is None:
            self.out[(slice(None),) + dst] = p[(slice(None),) + src]
        else:
            # The slice's sums in the slice's order: out += p * w and norm += w, tile after tile.
            self.out[(slice(None),) + dst] += p[(slice(None),) + src] * self.weights[src]
            self.norm[dst] += self.weights[src]

    def result(self) -> torch.Tensor:
        """``(K, bh, bw)`` float32 of the write box, once every tile was added."""
        if not self.done:
            raise ValueError(f"{self.num_tiles - self.added} of {self.num_tiles} tiles not predicted yet")
        self.canvas = None  # free the input before the caller goes on
        return self.out if self.norm is None else self.out / self.norm


def _predict_batch(pending: deque, forward: Callable[[torch.Tensor], torch.Tensor], batch: int) -> int:
    """One forward of up to ``batch`` tiles taken in order from the open blocks; returns how many."""
    pieces, size = [], 0
    for bt in pending:
        if size == batch:
            break
        n = min(batch - size, bt.num_tiles - bt.taken)
        if n > 0:
            pieces.append((bt, bt.taken, n))
            bt.taken += n
            size += n
    pred = forward(torch.stack([v for bt, start, n in pieces for v in bt.tile_views(start, start + n)]))
    offset = 0
    for bt, start, n in pieces:
        bt.add(start, pred[offset:offset + n])
        offset += n
    return size


def predict_blocks(blocks: Iterable[Block], grid: BlockGrid, read: Callable[[Block], torch.Tensor],
                   forward: Callable[[torch.Tensor], torch.Tensor], finish: Callable[[Block, torch.Tensor], None],
                   batch: int, *, blend: str | None = None, num_outputs: int | None = None) -> int:
    """Predict blocks with tiles batched across them, as the stack pipeline batches tiles across slices.

    Args:
        blocks: the blocks to do, in order (e.g. those of ``grid`` not yet done).
        grid: their grid.
        read: a block -> its read box of slice ``block.z``, a ``(C, rh, rw)`` float tensor on the device.
        forward: a tile batch ``(n, C, t, t)`` -> predictions ``(n, K, o, o)`` (softmax, TTA already applied).
        finish: called with each block and its ``(K, bh, bw)`` result, in block order.
        batch: tiles per forward pass (every forward but the last is full).
        blend: the ``same`` windows' blend (None for a ``valid`` model).
        num_outputs: expected channels of the predictions, or None.

    Returns:
        The number of blocks predicted.
    """
    pending: deque[BlockTiles] = deque()
    queued = count = 0
    for block in blocks:
        image = read(block)
        weights = None if blend is None else weight_map(grid.plan.tile_size, blend, image.device)
        pending.append(BlockTiles(block, grid, image, weights, num_outputs))
        queued += pending[-1].num_tiles
        del image
        while queued >= batch:
            queued -= _predict_batch(pending, forward, batch)
            count += _finish_done(pending, finish)
    while queued:
        queued -= _predict_batch(pending, forward, batch)
        count += _finish_done(pending, finish)
    return count


def _finish_done(pending: deque, finish: Callable[[Block, torch.Tensor], None]) -> int:
    """Hand the finished blocks at the front of ``pending`` to ``finish``; returns how many."""
    count = 0
    while pending and pending[0].done:
        bt = pending.popleft()
        finish(bt.block, bt.result())
        count += 1
    return count
