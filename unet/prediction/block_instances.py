"""Cell instances of a block-wise run: one id per cell across block faces, unique over the volume (issue 20 item 6),
in memory bounded by the block and its halo (item 7).

The slice path labels a whole slice at once (:func:`unet.prediction.instances.cell_instances`). A block-wise run
(:mod:`unet.prediction.volume_jobs`) never holds a slice, so its instances are made in passes over the same blocks,
each shared among torchrun ranks like the prediction and recorded block by block (:mod:`.block_records`), so that
``--resume`` redoes only what is missing:

1. **Prediction** (the block pass) also keeps every block's float32 cell probability: the ``--probabilities``
   output itself when it is float32, else a temporary store in the run's records folder.
2. **Labels** (per block): the cell probability of the block's write box plus ``halo`` pixels on each side (its
   *view*, clipped to the slice) goes through ``cell_instances`` (the smoothing and the seeds need that context).
   The write box's labels, renumbered 1..n, go to a temporary store; the block's record keeps n and, for each of
   its 8 neighbours in the slice, the labels the view gives to the overlap of the two views (a band 2 x halo wide
   across a face, a 2 x halo square at a corner), with ids that reach no write-box pixel set to 0.
3. **Merge** (rank 0, slice by slice): in each overlap the two views' ids are matched when their IoU there is above
   ``iou`` (>= 0.5, so an id matches at most one id of the other view); the matches are joined, highest IoU first,
   by a union-find that never joins two ids of one block (that block's watershed told them apart, and a chain of
   matches through other views must not undo it). The classes get consecutive ids over the volume in the order of
   their first id (slice, block, the block's own order). **Relabel** (per block): the temporary labels are mapped
   to those ids and written into the ``--instances`` output (uint32); then rank 0 commits.

Why overlap in a halo, not a second watershed over the seams: each block is labelled once, with context, by the
same function as a slice; the merge needs only the small overlap records and one slice's id table, never pixels
of a whole slice; and the matching is the one cluster_tools/daisy users know (stitch by overlap, union-find).
elf's ``stitch_segmentation`` decides by a multicut over the whole volume's region graph, which needs it whole.

Limits: a cell that two views split differently (one sees one cell, the other two) cannot be matched one to one:
its largest pieces are joined when their IoU passes the threshold, the others stay cells of their own, so the
cell is split at the face (never merged with a neighbour). With ``fill`` the membrane pixels far from any seed in a
block's view may go to another cell than in the whole slice's watershed; cells themselves agree when the halo
holds their seeds. Memory: a block's view in float64 and the watershed's arrays (pass 2), the overlap records of
two neighbours and one slice's id table, 8 bytes per cell of the slice (merge), a block's labels (relabel).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from unet.distributed import DistInfo, barrier, broadcast_object
from unet.errors import UserError
from unet.io.paths import parse_volume_path
from unet.io.volume_writers import VolumeWriter, create_volume, open_partial_volume, partial_path
from unet.options import option, positive_int
from unet.prediction.block_records import BlockRecords
from unet.prediction.blocks import Block, BlockGrid
from unet.prediction.instances import GROUP, InstanceOptions, cell_instances

__all__ = ["StitchOptions", "BlockInstanceSettings", "InstancePasses", "InstanceStats", "label_block", "match_ids",
           "merge_slice", "neighbours", "view_box"]

LABELS, MERGED, RELABELLED = "labels", "merged", "relabelled"  # the record stages of passes 2, 3a (slices), 3b
LABEL_STORE, PROB_STORE = "block_labels.zarr", "cell_probabilities.zarr"  # temporary stores in the records folder
Box = tuple[int, int, int, int]  # y0, y1, x0, x1


def stitch_iou(text: str) -> float:
    """An IoU threshold in [0.5, 1) (below 0.5 an id could match two ids of the other view)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be a number in [0.5, 1), got {text!r}") from None
    if not (0.5 <= value < 1 and math.isfinite(value)):
        raise ValueError(f"must be in [0.5, 1), got {value:g}")
    return value


@dataclass(frozen=True)
class StitchOptions:
    """How block-wise instances are joined across blocks (see the module docstring).

    Attributes:
        halo: pixels of context on each side of a block's write box for its watershed; two neighbours' views
            overlap by twice this across their face, where their ids are matched.
        iou: two views' ids of one cell are joined when their IoU in the overlap is above this, in [0.5, 1).
    """

    halo: int = option(64, "block-wise --instances (.zarr/.h5 outputs of a volume): pixels of context on each side "
                           "of a block for its watershed; cells are joined across blocks by their overlap in it",
                       flags="--instance-halo", parse=positive_int, group=GROUP)
    iou: float = option(0.5, "block-wise --instances: join two blocks' ids of a cell when their IoU in the blocks' "
                             "overlap is above this, in [0.5, 1)", flags="--instance-stitch-iou", parse=stitch_iou,
                        group=GROUP)

    def __post_init__(self):
        if self.halo < 1 or not 0.5 <= self.iou < 1:
            raise ValueError(f"halo must be >= 1 and iou in [0.5, 1), got {self.halo} and {self.iou}")


@dataclass(frozen=True)
class BlockInstanceSettings:
    """The watershed's settings (as the slice path's) and the stitching's."""

    options: InstanceOptions = InstanceOptions()
    stitch: StitchOptions = StitchOptions()


@dataclass
class InstanceStats:
    """What this process did in the instance passes: blocks labelled, slices merged, joins, cells, blocks relabelled
    (merges and cells on rank 0 only)."""

    labelled: int = 0
    merged: int = 0
    joins: int = 0
    cells: int = 0
    relabelled: int = 0


# ------------------------------------------------------------------------------------------------ geometry

def view_box(block: Block, halo: int, height: int, width: int) -> Box:
    """The block's write box plus ``halo`` on each side, clipped to the slice: what its watershed sees."""
    y0, y1, x0, x1 = block.write_box
    return max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo)


def _meet(a: Box, b: Box) -> Box:
    return max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3])


def _within(outer: Box, inner: Box) -> tuple[slice, slice]:
    """``inner`` (inside ``outer``) as slices of an array of ``outer``."""
    return slice(inner[0] - outer[0], inner[1] - outer[0]), slice(inner[2] - outer[2], inner[3] - outer[2])


def neighbours(grid: BlockGrid, block: Block) -> list[Block]:
    """The up to 8 blocks of the same slice that touch ``block`` across a face or a corner. (With a halo larger than
    a block, farther views overlap too; a cell reaching a farther block crosses the ones between, so the faces and
    corners already chain its pieces.)"""
    by, bx = divmod(block.index % grid.blocks_per_slice, len(grid.xs))
    first = block.z * grid.blocks_per_slice
    return [grid.block(first + y * len(grid.xs) + x) for y in range(by - 1, by + 2) for x in range(bx - 1, bx + 2)
            if (y, x) != (by, bx) and 0 <= y < len(grid.ys) and 0 <= x < len(grid.xs)]


# ------------------------------------------------------------------------------------------------ the passes' work

def label_block(prob: np.ndarray, view: Box, write: Box, overlaps: dict[int, Box],
                options: InstanceOptions) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One block's cells from its view: the write box's labels and the block's record.

    Args:
        prob: the cell probability of ``view``.
        view, write: the block's view and write box (slice coordinates).
        overlaps: neighbour index -> the overlap of the two views.
        options: the watershed's settings.

    Returns:
        The write box's labels as uint32, renumbered 1..n in the watershed's order (0 = membrane), and the record:
        ``count`` (n) and ``n<neighbour>``, the same ids over each overlap; an id of the view that reaches no
        write-box pixel is 0 there (another block's cell, matched from that block's side).
    """
    lab = cell_instances(prob, options)
    kept = lab[_within(view, write)]
    ids = np.unique(kept[kept > 0])
    lut = np.zeros(int(lab.max(initial=0)) + 1, np.uint32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
    faces = {f"n{k}": lut[lab[_within(view, box)]] for k, box in overlaps.items()}
    return lut[kept], {"count": np.array(len(ids)), **faces}


def match_ids(a: np.ndarray, b: np.ndarray, iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The id pairs of two views of one overlap (0 = none) whose IoU there is above ``iou``.

    Returns:
        ``(ids of a, ids of b, IoU)``, one entry per pair; with ``iou >= 0.5`` no id appears twice.
    """
    a, b = a.ravel().astype(np.int64), b.ravel().astype(np.int64)
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    width = int(b.max()) + 1
    pairs, inter = np.unique(a[both] * width + b[both], return_counts=True)
    pa, pb = np.divmod(pairs, width)
    score = inter / (np.bincount(a)[pa] + np.bincount(b)[pb] - inter)
    keep = score > iou
    return pa[keep], pb[keep], score[keep]


class _Classes:
    """Union-find over one slice's ids whose classes never hold two ids of one block. A class's root is its first
    id, so numbering the roots in order numbers the cells in the order of their first id."""

    def __init__(self, owner: np.ndarray):
        self.owner = owner  # the block (within the slice) of each id
        self.parent = list(range(len(owner)))
        self.blocks: dict[int, set[int]] = {}  # root -> blocks of its class, once it has joined another

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def join(self, i: int, j: int) -> bool:
        """Join the classes of ids ``i`` and ``j`` unless they share a block; True when joined."""
        ri, rj = self.find(i), self.find(j)
        if ri == rj:
            return False
        bi, bj = self.blocks.get(ri, {int(self.owner[ri])}), self.blocks.get(rj, {int(self.owner[rj])})
        if bi & bj:
            return False
        lo, hi = min(ri, rj), max(ri, rj)
        self.parent[hi] = lo
        self.blocks[lo] = bi | bj
        self.blocks.pop(hi, None)
        return True

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def merge_slice(records: BlockRecords, grid: BlockGrid, z: int, iou: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Slice ``z``'s cells from its blocks' label records (pass 2).

    Returns:
        The cell number (1..m) of each of the slice's ids (block after block, each block's ids 1..n in order), each
        block's offset into that table (``offsets[k]..offsets[k + 1]``), and the number of joins made.
    """
    per_slice, first = grid.blocks_per_slice, z * grid.blocks_per_slice
    counts = [int(records.read(first + k, LABELS, "count")) for k in range(per_slice)]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    edges = []
    for k in range(per_slice):
        block = grid.block(first + k)
        for other in (o for o in neighbours(grid, block) if o.index > block.index):
            pa, pb, score = match_ids(records.read(block.index, LABELS, f"n{other.index}"),
                                      records.read(other.index, LABELS, f"n{block.index}"), iou)
            j = other.index - first
            edges += zip((-score).tolist(), (offsets[k] + pa - 1).tolist(), (offsets[j] + pb - 1).tolist())
    classes = _Classes(np.repeat(np.arange(per_slice), counts))
    joins = sum(classes.join(i, j) for _, i, j in sorted(edges))  # best IoU first; ties in id order
    _, number = np.unique(classes.roots(), return_inverse=True)
    return number.astype(np.int64) + 1, offsets, joins


# ------------------------------------------------------------------------------------------------ the run

def _reopen(spec: str) -> VolumeWriter:
    """An interrupted run's ``.partial`` volume (one line when it is gone)."""
    tmp = partial_path(parse_volume_path(spec).container)
    if not tmp.exists():
        raise UserError(f"--resume: {tmp} of the interrupted run is missing; pass --overwrite to start over")
    return open_partial_volume(spec)


class InstancePasses:
    """The instance passes of one block-wise job (see the module docstring); every rank makes one.

    Args:
        target: the ``--instances`` volume path (``.zarr``/``.h5``).
        grid: the job's blocks (pass 1's).
        chunks: the outputs' y/x chunks.
        records: the run's records (the temporary stores live in their folder and go with them).
        settings: watershed and stitching settings.
        dist: this process's rank (None: one process).
        overwrite: replace an existing ``target`` at commit.
    """

    def __init__(self, target: str | Path, grid: BlockGrid, chunks: tuple[int, int], records: BlockRecords,
                 settings: BlockInstanceSettings, dist: DistInfo | None = None, overwrite: bool = False):
        self.target, self.grid, self.chunks, self.records = str(target), grid, tuple(chunks), records
        self.settings, self.dist, self.overwrite = settings, dist or DistInfo(), overwrite
        self.stats = InstanceStats()
        self.output = self.labels = self.probs = self.own_probs = None

    def identity(self) -> dict:
        """What a resume must find unchanged (the manifest's ``instances`` entry)."""
        return {"output": str(Path(self.target).resolve()), **dataclasses.asdict(self.settings.options),
                **{f"stitch_{k}": v for k, v in dataclasses.asdict(self.settings.stitch).items()}}

    def open(self, probabilities: VolumeWriter | None, resuming: bool, opened: contextlib.ExitStack,
             finish: Callable[[Block, torch.Tensor], None]) -> Callable[[Block, torch.Tensor], None]:
        """Open the instance output and the temporary stores (rank 0 makes them for a new run, after the records; the
        other ranks join after it), entered on ``opened``.

        Args:
            probabilities: the run's float32 cell-probability output, or None (a temporary store keeps them).
            resuming: reopen an interrupted run's stores.
            opened: where the writers are entered (closed, not committed, on any exit).
            finish: pass 1's block finisher.

        Returns:
            ``finish``, first keeping the block's cell probability when a temporary store does, so that the block's
            record (made by ``finish`` last) covers it too.
        """
        if self.dist.is_main:
            self._open_stores(probabilities is None, resuming, opened)
        barrier()  # the stores exist before any other rank opens them
        if not self.dist.is_main:
            self._open_stores(probabilities is None, True, opened)
        self.probs = probabilities or self.own_probs
        if self.own_probs is None:
            return finish
        store = self.own_probs

        def keep_then_finish(block: Block, probs: torch.Tensor) -> None:
            store.write((block.z, block.y.start, block.x.start), probs[1].cpu().numpy()[None])
            finish(block, probs)

        return keep_then_finish

    def _open_stores(self, own_probs: bool, resuming: bool, opened: contextlib.ExitStack) -> None:
        stores = {"output": (self.target, np.uint32), "labels": (str(self.records.folder / LABEL_STORE), np.uint32)}
        if own_probs:
            stores["own_probs"] = (str(self.records.folder / PROB_STORE), np.float32)
        for name, (spec, dtype) in stores.items():
            writer = _reopen(spec) if resuming else create_volume(
                spec, self.grid.shape, dtype, (1, *self.chunks), overwrite=self.overwrite or name != "output")
            setattr(self, name, opened.enter_context(writer))

    def run(self) -> InstanceStats:
        """Passes 2 and 3, after every rank's prediction pass; a barrier after each, since the next reads what every
        rank wrote in it. Returns this rank's :class:`InstanceStats`."""
        self._label_blocks()
        barrier()
        if self.dist.is_main:
            self._merge_slices()  # small: overlap records and id tables, no pixels of the volume
        barrier()
        self._relabel_blocks()
        barrier()
        return self.stats

    def _mine(self, stage: str) -> Iterator[Block]:
        """This rank's blocks (``r, r + W, ...`` of those not recorded in ``stage``), one at a time; rank 0's listing
        of the records, so that every rank shares out the same remaining blocks."""
        done = broadcast_object(self.records.done(stage) if self.dist.is_main else set())
        remaining = (b for b in self.grid if b.index not in done)
        return itertools.islice(remaining, self.dist.rank, None, self.dist.world_size)

    def _label_blocks(self) -> None:
        """Pass 2: each block's view through the watershed; its write box's labels stored, its overlaps recorded."""
        _, height, width = self.grid.shape
        halo = self.settings.stitch.halo
        for block in self._mine(LABELS):
            view = view_box(block, halo, height, width)
            prob = self.probs.read((block.z, view[0], view[2]), (1, view[1] - view[0], view[3] - view[2]))[0]
            overlaps = {o.index: _meet(view, view_box(o, halo, height, width)) for o in neighbours(self.grid, block)}
            labels, record = label_block(prob, view, block.write_box, overlaps, self.settings.options)
            self.labels.write((block.z, block.y.start, block.x.start), labels[None])
            self.labels.flush()
            self.records.mark(block.index, LABELS, record)  # only now: the labels are written
            self.stats.labelled += 1

    def _merge_slices(self) -> None:
        """Pass 3a (rank 0): each slice's cells, numbered on from the previous slice's (slices in order, since each
        starts where the one before ended; a resume reads the recorded slices' last id)."""
        done, last = self.records.done(MERGED), 0
        for z in range(self.grid.shape[0]):
            if z in done:
                last = int(self.records.read(z, MERGED, "last"))
                continue
            number, offsets, joins = merge_slice(self.records, self.grid, z, self.settings.stitch.iou)
            end = last + int(number.max(initial=0))
            if end > np.iinfo(np.uint32).max:
                raise UserError(f"{self.target}: more than {np.iinfo(np.uint32).max} cells do not fit in uint32 "
                                f"labels; the volume has too many cells for one label volume")
            self.records.mark(z, MERGED, {"ids": (number + last).astype(np.uint32), "offsets": offsets,
                                          "last": np.array(end)})
            last = end
            self.stats.merged += 1
            self.stats.joins += joins
        self.stats.cells = last

    def _relabel_blocks(self) -> None:
        """Pass 3b: each block's temporary labels mapped to the cells' ids and written into the output."""
        table = (None, None, None)  # the slice of the last block, its ids and offsets (blocks come in slice order)
        for block in self._mine(RELABELLED):
            if table[0] != block.z:
                table = (block.z, self.records.read(block.z, MERGED, "ids"),
                         self.records.read(block.z, MERGED, "offsets"))
            _, ids, offsets = table
            k = block.index - block.z * self.grid.blocks_per_slice
            lut = np.concatenate([[0], ids[offsets[k]:offsets[k + 1]]]).astype(np.uint32)
            y0, y1, x0, x1 = block.write_box
            self.output.write((block.z, y0, x0), lut[self.labels.read((block.z, y0, x0), (1, y1 - y0, x1 - x0))])
            self.output.flush()
            self.records.mark(block.index, RELABELLED)
            self.stats.relabelled += 1
