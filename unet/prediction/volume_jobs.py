"""Block-wise, resumable inference of one chunked volume into chunked outputs (infer.py's path when ``--input`` is a
zarr/N5/HDF5 volume and every output is ``.zarr``/``.h5``, without ``--overlay``; ``--instances`` are stitched
across blocks by :mod:`unet.prediction.block_instances`).

Each slice is cut into blocks of whole output chunks (:mod:`unet.prediction.blocks`); a block reads only its read
box (write box + halo) from the input, so host and device memory depend on the block size and the tile batch,
never on the slice or volume size. Finished blocks are written straight into the outputs' ``.partial``
containers (:func:`unet.io.volume_writers.create_volume`) and recorded as complete afterwards
(:mod:`unet.prediction.block_records`). A run that dies keeps both; ``--resume`` reopens them, checks that the
checkpoint, tiling, input and outputs are the interrupted run's, and predicts only the blocks not recorded.
When every block is in, the outputs are renamed to their final names and the records removed.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from unet.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object
from unet.errors import UserError
from unet.io.images import as_image, check_finite
from unet.io.paths import parse_volume_path
from unet.io.volume_writers import VolumeWriter, create_volume, open_partial_volume, partial_path
from unet.prediction.block_io import BlockIO, threaded_block_io
from unet.prediction.block_instances import BlockInstanceSettings, InstancePasses
from unet.prediction.block_records import BlockRecords
from unet.prediction.blocks import Block, BlockGrid, block_grid, block_shape_for, predict_blocks
from unet.prediction.jobs import Job
from unet.prediction.pipeline import StackPredictor
from unet.prediction.predictor import (check_channels, eval_mode, mask_from_probabilities, probability_shape,
                                      written_probabilities)
from unet.prediction.tiling import tile_batch_size

__all__ = ["BlockJobSettings", "BlockStats", "run_block_job", "job_grid"]


@dataclass(frozen=True)
class BlockJobSettings:
    """What a block-wise job needs of infer.py's settings (``InferOptions`` fills it).

    Attributes:
        chunks: y/x chunk shape of the outputs (clamped to the slice).
        block_size: y/x block size, rounded up to whole chunks.
        prob_dtype: ``float32`` or ``uint8`` probabilities.
        overwrite: replace existing outputs and records.
        resume: continue an interrupted run (its records must match this run's identity).
        identity: what else makes the run (checkpoints' SHA-256, precision), recorded in the manifest.
        io: ``auto``, ``threads`` or ``inline``: read and write in threads beside the device loop
            (:func:`unet.prediction.block_io.threaded_block_io`); not part of the identity (same results).
    """

    chunks: tuple[int, int]
    block_size: tuple[int, int]
    prob_dtype: str = "float32"
    overwrite: bool = False
    resume: bool = False
    identity: dict | None = None
    io: str = "auto"


@dataclass
class BlockStats:
    """What a block-wise job did: blocks in the volume, found complete (resume), predicted now (over the ranks, and
    by each rank: rank r's count at index r)."""

    blocks: int = 0
    skipped: int = 0
    predicted: int = 0
    by_rank: list[int] = field(default_factory=list)


def job_grid(job: Job, predictor: StackPredictor, settings: BlockJobSettings) -> tuple[BlockGrid, tuple[int, int]]:
    """The job's block grid and its outputs' chunk shape."""
    stack = job.stack
    hw = (stack.height, stack.width)
    chunks = tuple(min(c, n) for c, n in zip(settings.chunks, hw))
    block = block_shape_for(chunks, settings.block_size, hw)
    return block_grid((stack.num_slices, *hw), block, predictor.model, predictor.options), chunks


def _manifest(job: Job, grid: BlockGrid, predictor: StackPredictor, settings: BlockJobSettings,
              chunks: tuple[int, int]) -> dict:
    """The run's identity for the records: a resume must agree on every entry."""
    stack, options, plan = job.stack, predictor.options, grid.plan
    tiling = {"padding": predictor.model.padding, "tile_size": plan.tile_size, "tta": options.tta}
    if predictor.model.padding == "same":
        tiling.update(overlap=options.overlap, blend=options.blend)
    return {"input": {"path": str(Path(stack.path).resolve()), "shape": [stack.num_slices, stack.height, stack.width],
                      "channels": stack.channels, "dtype": str(stack.dtype), **vars(job.volume)},
            "tiling": tiling, "chunks": list(chunks), "block_size": list(grid.block_shape), "blocks": len(grid),
            "outputs": {"masks": str(Path(job.output).resolve()), "probabilities": None if job.probabilities is None
                        else str(Path(job.probabilities).resolve()), "prob_dtype": settings.prob_dtype},
            **(settings.identity or {})}


def _targets(job: Job, settings: BlockJobSettings, shape: tuple[int, int, int],
             num_classes: int) -> dict[str, tuple[Path, np.dtype, tuple[int, ...]]]:
    """Each output's path, dtype and shape (a K-class model's probabilities have a channel axis)."""
    targets = {"masks": (job.output, np.dtype(np.uint8), shape)}
    if job.probabilities is not None:
        targets["probabilities"] = (job.probabilities, np.dtype(settings.prob_dtype),
                                    probability_shape(shape, num_classes))
    return targets


def _open_writers(job: Job, grid: BlockGrid, chunks: tuple[int, int], settings: BlockJobSettings,
                  resuming: bool, opened: contextlib.ExitStack, num_classes: int) -> dict[str, VolumeWriter]:
    """Each output's writer: the interrupted run's ``.partial`` when resuming, else a new one."""
    writers = {}
    for kind, (path, dtype, shape) in _targets(job, settings, grid.shape, num_classes).items():
        if resuming:
            if not partial_path(parse_volume_path(path).container).exists():
                raise UserError(f"--resume: {partial_path(parse_volume_path(path).container)} of the interrupted run "
                                f"is missing; pass --overwrite to start over")
            writer = open_partial_volume(str(path))
        else:
            # Chunks one slice (and one channel) deep.
            writer = create_volume(str(path), shape, dtype, (1,) * (len(shape) - 2) + chunks,
                                   overwrite=settings.overwrite)
        writers[kind] = opened.enter_context(writer)
    return writers


def _host_reader(vol, job: Job) -> Callable[[Block], torch.Tensor]:
    """Block -> its read box as a [0, 1] float tensor on the host, checked as the stack reader checks pages."""
    source = str(job.stack.path)

    def read(block: Block) -> torch.Tensor:
        y0, y1, x0, x1 = block.read_box
        raw = vol.read(z=slice(block.z, block.z + 1), y=slice(y0, y1), x=slice(x0, x1))
        check_finite(raw, source, block.z)
        return torch.from_numpy(as_image(raw[0], source, None))

    return read


def _predict_blocks(blocks: Iterable[Block], grid: BlockGrid, read_host: Callable[[Block], torch.Tensor],
                    finish: Callable[[Block, torch.Tensor], None], predictor: StackPredictor, io: str) -> None:
    """Predict ``blocks``: reading and writing inline, or in threads beside the device loop (:mod:`.block_io`)."""
    model, device = predictor.model, predictor.dev.device
    batch = tile_batch_size(grid.plan, model, predictor.options)
    blend = predictor.options.blend if model.padding == "same" else None

    def on_device(host: torch.Tensor) -> torch.Tensor:
        x = host.to(device, non_blocking=True)
        check_channels(model, x)
        return x

    def run(blocks, read, finish) -> None:
        with eval_mode(model), torch.inference_mode():
            predict_blocks(blocks, grid, read, lambda tiles: predictor.forward_batch(tiles, batch), finish, batch,
                           blend=blend, num_outputs=model.config.num_classes)

    if threaded_block_io(io, predictor.dev.type):
        with BlockIO(blocks, read_host, finish, predictor.dev) as threads:
            run(threads.blocks(), lambda block: on_device(threads.take(block)), threads.finish)
    else:
        run(blocks, lambda block: on_device(read_host(block)), finish)


def _finisher(writers: dict[str, VolumeWriter], records: BlockRecords, settings: BlockJobSettings, grid: BlockGrid,
              stats: BlockStats, progress) -> Callable[[Block, torch.Tensor], None]:
    """Block result -> its mask (class map) and probability chunks in the outputs, then its completion record."""
    def finish(block: Block, probs: torch.Tensor) -> None:
        y0, _, x0, _ = block.write_box
        writers["masks"].write((block.z, y0, x0), mask_from_probabilities(probs).cpu().numpy()[None])
        if "probabilities" in writers:
            prob = written_probabilities(probs).cpu().numpy()
            if settings.prob_dtype == "uint8":
                prob = np.clip(np.rint(prob * 255), 0, 255).astype(np.uint8)
            writers["probabilities"].write((block.z,) + (0,) * (prob.ndim - 2) + (y0, x0), prob[None])
        for writer in writers.values():
            writer.flush()
        records.mark(block.index)  # only now: the block's chunks are with the operating system
        stats.predicted += 1
        if progress is not None and block.index % grid.blocks_per_slice == grid.blocks_per_slice - 1:
            progress.update(1)

    return finish


def _start(job: Job, grid: BlockGrid, chunks: tuple[int, int], settings: BlockJobSettings, records: BlockRecords,
           manifest: dict, dist: DistInfo, opened: contextlib.ExitStack,
           num_classes: int) -> tuple[dict[str, VolumeWriter], bool]:
    """Open the outputs for this rank: rank 0 creates them (or reopens an interrupted run's), the other ranks join
    after it; returns the writers and whether the run resumes."""
    resuming = settings.resume and records.exists()
    if resuming:
        records.check(manifest)  # every rank reads the same manifest, so every rank fails alike
    writers = None
    if dist.is_main:
        writers = _open_writers(job, grid, chunks, settings, resuming, opened, num_classes)
        if not resuming:
            records.start(manifest)
    barrier()  # the outputs and the manifest exist before any other rank opens them
    if writers is None:
        writers = _open_writers(job, grid, chunks, settings, True, opened, num_classes)
    return writers, resuming


def _found_done(records: BlockRecords, resuming: bool, grid: BlockGrid, stats: BlockStats, progress,
                dist: DistInfo) -> set[int]:
    """The blocks an interrupted run finished (none for a new run), counted and shown on the bar as whole slices.

    Rank 0 lists the records and sends the set to every rank: the ranks share out the *remaining* blocks, so all
    must see the same set (a rank listing later could see a block another rank has just finished)."""
    done = broadcast_object(records.done() if resuming and dist.is_main else set())
    stats.skipped = len(done)
    if progress is not None:
        progress.update(sum(1 for z in range(grid.shape[0])
                            if all(z * grid.blocks_per_slice + k in done for k in range(grid.blocks_per_slice))))
    return done


def _instance_passes(job: Job, grid: BlockGrid, chunks: tuple[int, int], records: BlockRecords,
                     settings: BlockJobSettings, instances: BlockInstanceSettings | None, dist: DistInfo,
                     manifest: dict) -> InstancePasses | None:
    """The cell-instance passes of a job with ``--instances`` (None without), their settings added to the manifest."""
    if job.instances is None:
        return None
    passes = InstancePasses(job.instances, grid, chunks, records, instances or BlockInstanceSettings(), dist,
                            settings.overwrite)
    manifest["instances"] = passes.identity()
    return passes


def run_block_job(job: Job, predictor: StackPredictor, settings: BlockJobSettings, *, progress=None,
                  dist: DistInfo | None = None, instances: BlockInstanceSettings | None = None) -> BlockStats:
    """Predict one chunked volume block by block into its chunked outputs; resumable (see the module docstring).

    Under torchrun every rank calls this: rank ``r`` of ``W`` predicts the blocks ``r, r + W, ...`` of those not
    recorded as complete and writes them into the shared ``.partial`` zarr outputs (chunk-aligned blocks never
    share a chunk); only rank 0 creates the outputs and the manifest and, once every rank is done, commits.
    With ``job.instances`` the cell instances follow in passes of their own (:mod:`unet.prediction.block_instances`).

    Args:
        job: a job whose ``blockwise`` is true (from :func:`unet.prediction.jobs.plan_jobs`).
        predictor: the stack predictor (model, device, tiling options, forward); its tiling must be the same
            on every rank (infer.py broadcasts rank 0's memory budget).
        settings: chunks, block size, probability dtype, overwrite/resume and the run's identity.
        progress: a tqdm bar advanced by one per finished slice, or None.
        dist: this process's rank (None: one process).
        instances: the watershed and stitching settings of ``job.instances`` (None: the defaults).

    Returns:
        :class:`BlockStats` (``predicted`` summed over the ranks).

    Raises:
        UserError: bad input found while reading, a refused resume, a failed write. The ``.partial`` outputs
            and the records of finished blocks stay for ``--resume``.
    """
    dist = dist or DistInfo()
    grid, chunks = job_grid(job, predictor, settings)
    manifest = _manifest(job, grid, predictor, settings, chunks)
    records = BlockRecords(parse_volume_path(job.output).container)
    passes = _instance_passes(job, grid, chunks, records, settings, instances, dist, manifest)
    stats = BlockStats(blocks=len(grid))
    barrier()  # every rank has checked the outputs (plan_jobs) before rank 0 creates them
    with contextlib.ExitStack() as opened:
        writers, resuming = _start(job, grid, chunks, settings, records, manifest, dist, opened,
                                   predictor.model.config.num_classes)
        done = _found_done(records, resuming, grid, stats, progress, dist)
        finish = _finisher(writers, records, settings, grid, stats, progress)
        if passes is not None:
            finish = passes.open(_float_cell_probabilities(writers, settings), resuming, opened, finish)
        vol = opened.enter_context(job.volume.open(str(job.stack.path)))
        # Round-robin over the blocks still to do, not over all blocks: after a kill the unrecorded blocks may all
        # be a few ranks' share (those that died early), and a resume should spread them over every rank.
        mine = itertools.islice((b for b in grid if b.index not in done), dist.rank, None, dist.world_size)
        _predict_blocks(mine, grid, _host_reader(vol, job), finish, predictor, settings.io)
        mine_done = torch.zeros(dist.world_size, dtype=torch.int64)
        mine_done[dist.rank] = stats.predicted
        stats.by_rank = all_reduce_sum(mine_done, predictor.dev.device).tolist()
        stats.predicted = sum(stats.by_rank)
        barrier()  # every rank's blocks are written
        if passes is not None:
            passes.run()  # the instances, in passes of their own, shared among the ranks like the blocks
        if dist.is_main:
            for writer in [*writers.values(), *([passes.output] if passes is not None else [])]:
                writer.commit()
    if dist.is_main:
        records.remove()
    return stats


def _float_cell_probabilities(writers: dict[str, VolumeWriter], settings: BlockJobSettings) -> VolumeWriter | None:
    """The probability output when it holds the float32 cell probabilities the watershed reads, else None."""
    writer = writers.get("probabilities")
    usable = writer is not None and settings.prob_dtype == "float32" and writer.axes == "zyx"
    return writer if usable else None
