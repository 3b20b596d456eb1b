"""Inference: image stacks in, uint8 masks (plus optional probabilities, instances and overlay PNGs) out, streaming.

:func:`run_inference` reads each job's stack (:mod:`unet.prediction.jobs`) a few pages at a time, predicts
it with :class:`unet.prediction.pipeline.StackPredictor` and appends the results to the output files
(:mod:`unet.io.writers`) as it goes, so peak host memory depends on the slice size and ``read_batch``, never
on the stack depth. Every output is written to a hidden temporary file beside its final name and renamed
only when complete: an interrupted run never leaves a half-written file.

Output convention is the training labels': 255 = cell interior, 0 = membrane, one page per input slice.
:class:`InferOptions` holds infer.py's own settings (the command is :mod:`unet.cli.infer`).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from unet.errors import UserError
from unet.io.writers import COMPRESSIONS, LabelStackWriter, StackWriter, write_png_atomic
from unet.options import option, positive_int
from unet.prediction.instances import InstanceOptions, cell_instances
from unet.prediction.jobs import Job, iter_job_pages
from unet.prediction.overlay import overlay
from unet.prediction.pipeline import StackPredictor
from unet.prediction.tiling import TilingOptions

PROB_DTYPES = ("float32", "uint8")


@dataclass(frozen=True)
class InferOptions:
    """infer.py's own settings: inputs, outputs and how they are written (tiling, instances, device apart).

    Attributes:
        input: a stack/image file, a folder of them, or None for the built-in synthetic stack.
        output: the mask TIFF (a folder for folder input).
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
    """

    input: str | None = option(None, "multi-page TIFF (plain, ImageJ, OME), single TIFF/PNG, or a folder of them; "
                                     "None = the built-in synthetic stack of 4 slices of 256x256", flags="--input")
    output: str | None = option(None, "mask TIFF to write (a folder when --input is a folder)", flags="--output")
    probabilities: str | None = option(None, "also write the cell-interior probability stack here (a folder for "
                                             "folder input)", flags="--probabilities")
    prob_dtype: str = option("float32", "probability pixels: float32 in [0, 1], or uint8 scaled 0..255",
                             flags="--prob-dtype", choices=PROB_DTYPES)
    overlay: str | None = option(None, "write one PNG per slice with predicted membranes drawn in red over the "
                                       "input", flags="--overlay", metavar="DIR")
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
                                         "input); settings below", flags="--instances", metavar="OUT.tif")


@dataclass
class RunResult:
    """What an inference run wrote and how fast.

    Args:
        outputs: every file written.
        slices: slices predicted.
        seconds: wall time of the prediction and writing.
        warmup_seconds: the untimed warm-up forward before it (0 when none ran).
        startup_seconds: checkpoint loading and device set-up before that (set by :func:`main`).
    """

    outputs: list[Path] = field(default_factory=list)
    slices: int = 0
    seconds: float = 0.0
    warmup_seconds: float = 0.0
    startup_seconds: float = 0.0

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
    """

    def __init__(self, job: Job, writers: dict, prob_dtype: str, instance_options: InstanceOptions | None,
                 progress):
        self.job, self.writers, self.prob_dtype = job, writers, prob_dtype
        self.instance_options, self.progress = instance_options, progress
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
            write_png_atomic(self.overlay_paths[k], overlay(image, mask))
            self.written.append(self.overlay_paths[k])
        if self.progress is not None:
            self.progress.update(1)

    def changed(self) -> UserError:
        return UserError(f"{self.source}: the number of slices changed during the run (its header said "
                         f"{self.job.stack.num_slices}); keep inputs unchanged while infer.py runs")


def _open_writers(job: Job, stack: contextlib.ExitStack, prob_dtype: str, compression: str) -> dict:
    """The job's TIFF writers, entered on ``stack`` so that any failure deletes their temporary files."""
    pixels = job.stack.num_slices * job.stack.height * job.stack.width
    writers = {"masks": stack.enter_context(StackWriter(job.output, expected_bytes=pixels, compression=compression))}
    if job.probabilities is not None:
        writers["probabilities"] = stack.enter_context(StackWriter(
            job.probabilities, expected_bytes=pixels * np.dtype(prob_dtype).itemsize, compression=compression))
    if job.instances is not None:
        writers["instances"] = stack.enter_context(LabelStackWriter(job.instances, pixels=pixels,
                                                                    compression=compression))
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
            ``prob_dtype`` (``float32``, or ``uint8`` = probability x 255, rounded) and ``compression`` of the
            TIFF outputs count here (None: the defaults).
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
            sink = _JobSink(job, _open_writers(job, writers, settings.prob_dtype, settings.compression),
                            settings.prob_dtype, instance_options or InstanceOptions(), progress)
            count = predictor.run(iter_job_pages(job.stack, settings.read_batch), sink, source=sink.source,
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


def run_inference(model: torch.nn.Module, dev, jobs: list[Job], settings: InferOptions | None = None, *,
                  options: TilingOptions | None = None, instance_options: InstanceOptions | None = None,
                  forward=None, warm_up: bool | None = None) -> RunResult:
    """Run :func:`run_job` for every job with one progress bar over all slices (stderr).

    Args:
        model: a UNet (or Ensemble) on ``dev.device``.
        dev: the device setup.
        jobs: from :func:`unet.prediction.jobs.plan_jobs`.
        settings, options, instance_options: as for :func:`run_job`; ``settings.no_progress`` hides the bar.
        forward: called instead of ``model`` on the tiles (e.g. ``torch.compile(model)``).
        warm_up: one untimed forward first (kernel choice, compilation); None = off CPU or with ``forward``.

    Returns:
        A :class:`RunResult` (``seconds`` excludes the warm-up, which is ``warmup_seconds``).
    """
    settings = settings or InferOptions()
    predictor = StackPredictor(model, dev, options, forward=forward)
    result = RunResult()
    if jobs and (warm_up if warm_up is not None else (dev.type != "cpu" or forward is not None)):
        start = time.perf_counter()
        predictor.warm_up(jobs[0].stack.height, jobs[0].stack.width)
        result.warmup_seconds = time.perf_counter() - start
    total = sum(j.stack.num_slices for j in jobs)
    start = time.perf_counter()
    with tqdm(total=total, unit="slice", desc="infer", file=sys.stderr, disable=settings.no_progress,
              dynamic_ncols=True) as bar:
        for job in jobs:
            result.outputs += run_job(job, model, dev, settings, progress=bar, instance_options=instance_options,
                                      predictor=predictor)
            result.slices += job.stack.num_slices
    dev.synchronize()
    result.seconds = time.perf_counter() - start
    return result
