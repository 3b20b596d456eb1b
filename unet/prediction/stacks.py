"""Inference: image stacks in, uint8 masks or class maps (plus optional probabilities, instances and overlay PNGs)
out, streaming.

:func:`run_inference` reads each job's stack (:mod:`unet.prediction.jobs`) a few pages at a time, predicts
it with :class:`unet.prediction.pipeline.StackPredictor` and appends the results to the output files
(:mod:`unet.io.writers`) as it goes, so peak host memory depends on the slice size and ``read_batch``, never
on the stack depth. Every output is written to a hidden temporary file beside its final name and renamed
only when complete: an interrupted run never leaves a half-written file. Outputs whose path names a zarr or
HDF5 container (``out.zarr/masks``, ``out.h5``) are chunked volumes (:mod:`unet.io.volume_stacks`), built under
``<container>.partial`` and renamed likewise. A chunked volume input whose outputs are all chunked (instances
too, and no overlays) goes block by block instead (:mod:`unet.prediction.volume_jobs`: bounded by the block,
resumable with ``--resume``; instances stitched across blocks by :mod:`unet.prediction.block_instances`).

Output convention is the training labels', one page per input slice: for a two-class model 255 = cell interior,
0 = membrane, and ``--probabilities`` the cell probability; for a K-class model the class map 0..K-1, and all K
class probabilities (an ImageJ hyperstack ZCYX in TIFF, a ``czyx`` volume in OME-Zarr / HDF5).
:class:`InferOptions` holds infer.py's own settings (the command is :mod:`unet.cli.infer`).
"""
from __future__ import annotations

import contextlib
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from unet.distributed import DistInfo
from unet.errors import UserError
from unet.host_memory import HOST_ALLOCATORS
from unet.io.volume_stacks import DEFAULT_CHUNKS, LabelVolumeStackWriter, VolumeStackWriter, chunk_yx
from unet.io.writers import COMPRESSIONS, HyperstackWriter, LabelStackWriter, StackWriter, write_png_atomic
from unet.options import option, positive_int
from unet.prediction.block_io import BLOCK_IO
from unet.prediction.block_instances import BlockInstanceSettings, StitchOptions
from unet.prediction.instances import InstanceOptions, cell_instances
from unet.prediction.jobs import Job, is_volume_path, iter_job_pages
from unet.prediction.overlay import overlay
from unet.prediction.pipeline import TILE_PLANS, StackPredictor
from unet.prediction.predictor import probability_shape
from unet.prediction.tiling import TilingOptions
from unet.prediction.volume_jobs import BlockJobSettings, run_block_job

PROB_DTYPES = ("float32", "uint8")
BACKENDS = ("torch", "openvino")
# 4096 x 4096 blocks: 64 MB of float32 input per block plus its halo, and a tile reaching two blocks (computed
# by both) is rare next to the ~8 x 8 tiles inside one.
DEFAULT_BLOCK = (4096, 4096)


@dataclass(frozen=True)
class InferOptions:
    """infer.py's own settings: inputs, outputs and how they are written (tiling, instances, device apart).

    Attributes:
        input: a stack/image file, a folder of them, a chunked volume path, or None for the built-in synthetic stack.
        output: the mask TIFF or chunked volume (a folder for folder input).
        probabilities: the probability stack (or folder), or None.
        prob_dtype: ``float32`` or ``uint8`` probability pixels.
        overlay: folder for overlay PNGs, or None.
        compression: ``zlib`` or ``none`` for the TIFF outputs.
        read_batch: input pages read at a time.
        overwrite: replace existing outputs.
        no_progress: no progress bar.
        export: the removed ``--export`` (refused with a pointer to export.py).
        compile: ``torch.compile`` the model.
        instances: the cell instance label stack (or folder), or None.
        chunks: y/x chunk shape of chunked (``.zarr``/``.h5``) outputs; chunks are one slice deep.
        tile_plan: ``speed`` (time candidate plans on the device) or ``flops`` (fewest FLOPs), where no tile size
            is given.
        backend: ``torch`` or ``openvino`` (the caller builds the OpenVINO forward).
        block_size: y/x size of the blocks a chunked volume is predicted in (rounded up to whole chunks).
        block_io: ``auto``, ``threads`` or ``inline`` (:func:`unet.prediction.block_io.threaded_block_io`).
        host_allocator: ``auto`` (glibc keeps freed memory for reuse on the CPU, :mod:`unet.host_memory`) or
            ``system``.
        resume: finish an interrupted block-wise run, predicting only the blocks not recorded as complete.
    """

    input: str | None = option(None, "multi-page TIFF (plain, ImageJ, OME), single TIFF/PNG, a folder of them, or a "
                                     "volume in a zarr/OME-Zarr, N5 or HDF5 container (volume.zarr/raw, "
                                     "image.ome.zarr, data.n5/raw, data.h5/volumes/raw); None = the built-in "
                                     "synthetic stack of 4 slices of 256x256", flags="--input")
    output: str | None = option(None, "masks to write, uint8, one page per slice: 255 = cell, 0 = membrane for a "
                                      "two-class model, the class map 0..K-1 for a K-class one; a TIFF (.tif), an "
                                      "OME-Zarr (out.zarr or out.zarr/KEY) or an HDF5 dataset (out.h5/KEY, key "
                                      "'data' when none); a folder of TIFFs when --input is a folder; "
                                      "--probabilities and --instances alike", flags="--output")
    probabilities: str | None = option(None, "also write probabilities here: the cell probability (one page per "
                                             "slice) of a two-class model, all K of a K-class one (TIFF: an "
                                             "uncompressed ImageJ hyperstack ZCYX, K channels; .zarr/.h5: axes "
                                             "c, z, y, x); a folder for folder input", flags="--probabilities")
    prob_dtype: str = option("float32", "probability pixels: float32 in [0, 1], or uint8 scaled 0..255",
                             flags="--prob-dtype", choices=PROB_DTYPES)
    overlay: str | None = option(None, "write one PNG per slice with predicted membranes drawn in red over the "
                                       "input (a K-class model: each class in its own colour)", flags="--overlay",
                                 metavar="DIR")
    compression: str = option(COMPRESSIONS[0], "TIFF compression of the outputs (zlib = deflate, read by Fiji, "
                                               "tifffile, Pillow)", flags="--compression", choices=COMPRESSIONS)
    read_batch: int = option(8, "input pages read at a time (host memory scales with this, not the stack depth)",
                             flags="--read-batch", parse=positive_int)
    overwrite: bool = option(False, "replace existing output files", flags="--overwrite", switch="on")
    no_progress: bool = option(False, "no progress bar", flags="--no-progress", switch="on")
    export: str | None = option(None, "removed: programs are written by export.py --format pt2|onnx (this flag "
                                      "only says so)", flags="--export", metavar="PATH")
    compile: bool = option(False, "torch.compile the model for the tile shape (start-up cost; pays off on long "
                                  "stacks)", flags="--compile", switch="on", group="speed")
    instances: str | None = option(None, "also write a label stack: one id per cell, unique over the stack, "
                                         "0 = membrane; uint16, or uint32 above 65535 cells (a folder for folder "
                                         "input; always uint32 in .zarr/.h5 outputs); two-class models only; "
                                         "settings below",
                                 flags="--instances", metavar="OUT.tif")
    chunks: tuple[int, int] = option(DEFAULT_CHUNKS, "y/x chunk shape of .zarr/.h5 outputs, N or HxW pixels (chunks "
                                                     "are one slice deep)", flags="--chunks", parse=chunk_yx,
                                     metavar="N|HxW")
    backend: str = option("torch", "runtime of the forward pass: torch, or openvino (CPU only, pip install "
                                   "openvino; measured 1.5-1.75x torch in bf16 on an AMX Xeon, see "
                                   "docs/benchmarks.md)", flags="--backend", choices=BACKENDS, group="speed")
    tile_plan: str = option("speed", "speed: time a few tile sizes and tile batches on the device and keep the "
                                     "fastest (printed; pin it with --tile-size/--tile-batch); flops: the "
                                     "fewest-FLOP tiling that fits the memory budget", flags="--tile-plan",
                            choices=TILE_PLANS, group="speed")
    block_size: tuple[int, int] = option(DEFAULT_BLOCK, "y/x size of the blocks a zarr/N5/HDF5 --input with .zarr/.h5 "
                                                        "outputs is predicted in, N or HxW pixels, rounded up to "
                                                        "whole --chunks (memory scales with it, not the slice)",
                                         flags="--block-size", parse=chunk_yx, metavar="N|HxW")
    host_allocator: str = option("auto", "auto: on the CPU (Linux, glibc) freed memory stays in the heap for the "
                                         "next block or slice instead of one mmap per large tensor (block-wise "
                                         "stitching 25-35 % faster on a 2-core Xeon, docs/inference.md; printed); "
                                         "system: the C library's defaults", flags="--host-allocator",
                                 choices=HOST_ALLOCATORS, group="speed")
    block_io: str = option("auto", "block-wise reading and writing: threads (beside the device loop), inline, or "
                                   "auto = threads on a GPU/NPU, inline on a CPU (whose forwards use every core); "
                                   "same results either way", flags="--block-io", choices=BLOCK_IO, group="speed")
    resume: bool = option(False, "finish an interrupted block-wise run (same command): predict only the blocks not "
                                 "recorded as complete; refused if the checkpoint, tiling, input or outputs differ",
                          flags="--resume", switch="on")


@dataclass
class RunResult:
    """What an inference run wrote and how fast.

    Args:
        outputs: every file written.
        slices: slices predicted.
        seconds: wall time of the prediction and writing.
        warmup_seconds: the untimed warm-up forward before it (0 when none ran).
        startup_seconds: checkpoint loading and device set-up before that (set by :func:`main`).
        plans: the tile plan of each slice size, as said to the user (``--tile-plan speed`` timed them within
            ``seconds``, or within ``warmup_seconds`` when a warm-up ran).
        blocks: blocks of the block-wise jobs (0 when none ran block-wise).
        blocks_skipped: of those, found complete by ``--resume`` and not predicted again.
        blocks_by_rank: blocks each rank predicted (rank r's at index r; empty when none ran block-wise).
    """

    outputs: list[Path] = field(default_factory=list)
    slices: int = 0
    blocks: int = 0
    blocks_skipped: int = 0
    blocks_by_rank: list[int] = field(default_factory=list)
    seconds: float = 0.0
    warmup_seconds: float = 0.0
    startup_seconds: float = 0.0
    plans: list[str] = field(default_factory=list)

    @property
    def slices_per_s(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else float("nan")


class _JobSink:
    """The writer thread's end of one job: appends each predicted slice to the job's outputs.

    Args:
        job: the job.
        writers: open writers by kind (``masks``, ``probabilities``, ``instances``).
        prob_dtype: ``float32`` or ``uint8``.
        instance_options: seeded-watershed settings when ``instances`` is written.
        progress: tqdm bar or None.
        num_classes: the model's K (how overlays draw the mask).
    """

    def __init__(self, job: Job, writers: dict, prob_dtype: str, instance_options: InstanceOptions | None,
                 progress, num_classes: int):
        self.job, self.writers, self.prob_dtype = job, writers, prob_dtype
        self.instance_options, self.progress, self.num_classes = instance_options, progress, num_classes
        self.overlay_paths = job.overlay_paths()
        self.written: list[Path] = []
        self.source = str(job.stack.path) if job.stack.path is not None else "synthetic"

    def __call__(self, k: int, image: np.ndarray | None, mask: np.ndarray, prob: np.ndarray | None) -> None:
        if k >= self.job.stack.num_slices:
            raise self.changed()
        self.writers["masks"].append(mask)
        if "probabilities" in self.writers:
            self.writers["probabilities"].append(
                prob if self.prob_dtype == "float32" else np.clip(np.rint(prob * 255), 0, 255).astype(np.uint8))
        if "instances" in self.writers:
            self.writers["instances"].append(cell_instances(prob, self.instance_options))
        if self.overlay_paths:
            write_png_atomic(self.overlay_paths[k], overlay(image, mask, self.num_classes))
            self.written.append(self.overlay_paths[k])
        if self.progress is not None:
            self.progress.update(1)

    def changed(self) -> UserError:
        return UserError(f"{self.source}: the number of slices changed during the run (its header said "
                         f"{self.job.stack.num_slices}); keep inputs unchanged while infer.py runs")


def _open_writers(job: Job, stack: contextlib.ExitStack, settings: InferOptions, num_classes: int) -> dict:
    """The job's writers (TIFF, or chunked volumes by the path), entered on ``stack`` so that any failure deletes
    their temporary files. A K-class model's probabilities have a channel per class (:func:`probability_shape`)."""
    shape = (job.stack.num_slices, job.stack.height, job.stack.width)
    pixels, compression = int(np.prod(shape)), settings.compression
    targets = {"masks": (job.output, np.dtype(np.uint8), shape),
               "probabilities": (job.probabilities, np.dtype(settings.prob_dtype),
                                 probability_shape(shape, num_classes))}
    writers = {}
    for kind, (path, dtype, volume) in targets.items():
        if path is None:
            continue
        if is_volume_path(path):
            writer = VolumeStackWriter(str(path), volume, dtype, settings.chunks, overwrite=settings.overwrite)
        elif len(volume) == 4:
            writer = HyperstackWriter(path)
        else:
            writer = StackWriter(path, expected_bytes=pixels * dtype.itemsize, compression=compression)
        writers[kind] = stack.enter_context(writer)
    if job.instances is not None:
        writers["instances"] = stack.enter_context(
            LabelVolumeStackWriter(str(job.instances), shape, settings.chunks, overwrite=settings.overwrite)
            if is_volume_path(job.instances) else LabelStackWriter(job.instances, pixels=pixels, compression=compression))
    return writers


def run_job(job: Job, model: torch.nn.Module, dev, settings: InferOptions | None = None, *, progress=None,
            options: TilingOptions | None = None, instance_options: InstanceOptions | None = None,
            predictor: StackPredictor | None = None) -> list[Path]:
    """Predict one input stack and write its outputs atomically.

    Args:
        job: from :func:`unet.prediction.jobs.plan_jobs`.
        model: a UNet (or Ensemble) on ``dev.device``.
        dev: the device setup.
        settings: ``read_batch`` (input pages read per chunk: memory scales with it, not with the stack depth),
            ``prob_dtype`` (``float32``, or ``uint8`` = probability x 255, rounded), ``compression`` of the
            TIFF outputs, ``chunks`` and ``overwrite`` of chunked outputs count here (None: the defaults).
        progress: a tqdm bar to advance by one per slice, or None.
        options: whole-slice tiling options (tile batches span slices, see :mod:`unet.prediction.pipeline`).
        instance_options: seeded-watershed settings for ``job.instances`` (None: the defaults).
        predictor: a :class:`~unet.prediction.pipeline.StackPredictor` to reuse (None: one of ``model``, ``dev``,
            ``options``).

    Returns:
        The files written.
    """
    settings = settings or InferOptions()
    if settings.prob_dtype not in PROB_DTYPES:
        raise ValueError(f"prob_dtype must be one of {PROB_DTYPES}, got {settings.prob_dtype!r}")
    predictor = predictor or StackPredictor(model, dev, options)
    sink = None
    try:
        with contextlib.ExitStack() as writers:
            classes = model.config.num_classes
            sink = _JobSink(job, _open_writers(job, writers, settings, classes),
                            settings.prob_dtype, instance_options or InstanceOptions(), progress, classes)
            count = predictor.run(iter_job_pages(job, settings.read_batch), sink, source=sink.source,
                                  keep_images=bool(sink.overlay_paths),
                                  keep_probabilities=job.probabilities is not None or job.instances is not None)
            if count != job.stack.num_slices:
                raise sink.changed()
    except BaseException:
        # The TIFF writers delete their temporary files; overlays of a failed stack go too, so that a
        # failed run leaves no partial output behind.
        for png in sink.written if sink is not None else []:
            with contextlib.suppress(OSError):
                png.unlink()
        raise
    return job.outputs()


def block_settings(settings: InferOptions, identity: dict | None = None) -> BlockJobSettings:
    """The block-wise job's share of infer.py's settings, with the run's identity (checkpoints, precision)."""
    return BlockJobSettings(settings.chunks, settings.block_size, settings.prob_dtype, settings.overwrite,
                            settings.resume, identity, settings.block_io)


def run_inference(model: torch.nn.Module, dev, jobs: list[Job], settings: InferOptions | None = None, *,
                  options: TilingOptions | None = None, instance_options: InstanceOptions | None = None,
                  forward=None, warm_up: bool | None = None, identity: dict | None = None,
                  dist: DistInfo | None = None, stitch: StitchOptions | None = None) -> RunResult:
    """Run :func:`run_job` for every job with one progress bar over all slices (stderr).

    Args:
        model: a UNet (or Ensemble) on ``dev.device``.
        dev: the device setup.
        jobs: from :func:`unet.prediction.jobs.plan_jobs`.
        settings, options, instance_options: as for :func:`run_job`; ``settings.no_progress`` hides the bar.
        forward: called instead of ``model`` on the tiles (e.g. ``torch.compile(model)``).
        warm_up: one untimed forward first (kernel choice, compilation); None = off CPU or with ``forward``.
        identity: what else identifies a block-wise run for ``--resume`` (checkpoints' SHA-256, precision).
        dist: this process's rank under torchrun (block-wise jobs share their blocks among ranks), None: one.
        stitch: how a block-wise job's instances are joined across blocks (None: the defaults).

    Returns:
        A :class:`RunResult` (``seconds`` excludes the warm-up, which is ``warmup_seconds``).
    """
    settings = settings or InferOptions()
    total = sum(j.stack.num_slices for j in jobs)
    # An OpenVINO forward converts each new shape in a second or two: the speed probe may still time it.
    predictor = StackPredictor(model, dev, options, forward=forward, tile_plan=settings.tile_plan, slices=total,
                               probe_forward=settings.backend == "openvino")
    result = RunResult()
    if jobs and (warm_up if warm_up is not None else (dev.type != "cpu" or forward is not None)):
        start = time.perf_counter()
        predictor.warm_up(jobs[0].stack.height, jobs[0].stack.width)
        result.warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with tqdm(total=total, unit="slice", desc="infer", file=sys.stderr, disable=settings.no_progress,
              dynamic_ncols=True) as bar:
        for job in jobs:
            if job.blockwise:
                stats = run_block_job(job, predictor, block_settings(settings, identity), progress=bar, dist=dist,
                                      instances=BlockInstanceSettings(instance_options or InstanceOptions(),
                                                                      stitch or StitchOptions()))
                result.outputs += job.outputs()
                result.blocks += stats.blocks
                result.blocks_skipped += stats.skipped
                result.blocks_by_rank = [a + b for a, b in
                                         itertools.zip_longest(result.blocks_by_rank, stats.by_rank, fillvalue=0)]
            else:
                result.outputs += run_job(job, model, dev, settings, progress=bar, instance_options=instance_options,
                                          predictor=predictor)
            result.slices += job.stack.num_slices
    dev.synchronize()
    result.seconds = time.perf_counter() - start
    result.plans = [f"{w}x{h}: {choice}" for (h, w), choice in predictor.choices.items()]
    return result
