"""Inference: image stacks in, uint8 masks (plus optional probabilities and overlay PNGs) out, streaming.

``python infer.py --ckpt model.pt --input stack.tif --output masks.tif`` reads the stack a few pages at a
time, predicts each slice with :func:`unet.prediction.predictor.predict_probabilities` (the one predictor) and appends
the results to the output TIFFs as it goes, so peak host memory depends on the slice size and
``--read-batch``, never on the stack depth. Every output is written to a hidden temporary file beside its
final name and renamed only when complete: an interrupted run never leaves a half-written file.

Output convention is the training labels': 255 = cell interior, 0 = membrane, one page per input slice.
Files are plain multi-page TIFFs with zlib (deflate) compression and no ImageJ hyperstack header, because
ImageJ's own reader only handles *uncompressed* hyperstacks (it reads the first IFD and assumes contiguous
pages; tifffile's documentation: "ImageJ hyperstacks do not support BigTIFF or compression"), whereas it
opens a plain deflate-compressed multi-page TIFF as a stack (Fiji File > Open, or Bio-Formats).
``--compression none`` writes uncompressed pages instead.

``--export model.pt2`` / ``--export model.onnx`` writes a deployable program instead (see :mod:`unet.export.programs`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from tqdm import tqdm

from unet.atomic import atomic_path, publish, temporary_path, write_errors
from unet.cli.common import HelpFormatter, add_options, argparse_type, options_from
from unet.device import DeviceOptions
from unet.options import positive_int as _positive_int
from unet.io.images import (TIFF_SUFFIXES, StackInfo, as_image, iter_chunks, iter_pages, list_images, scale_by_dtype,
                          stack_info)
from unet.data.synthetic import make_synthetic_em
from unet.device import setup_device
from unet.errors import UserError
from unet.prediction.ensemble import load_ensemble
from unet.export.programs import export_model
from unet.prediction.instances import InstanceOptions, cell_instances, label_dtype
from unet.prediction.pipeline import StackPredictor, mask_from_probabilities
from unet.prediction.predictor import free_memory_budget_mb, predict_probabilities
from unet.prediction.tiling import TilingOptions

PROB_DTYPES = ("float32", "uint8")
COMPRESSIONS = ("zlib", "none")
SYNTHETIC_SHAPE = (4, 256, 256)  # slices, height, width of the built-in stack used without --input
# Above this many uncompressed bytes a classic TIFF's 32-bit offsets could overflow: switch to BigTIFF.
BIGTIFF_BYTES = 3 * 2 ** 30
OVERLAY_RGB = np.array([255, 0, 0], dtype=np.float32)  # membranes drawn in red
OVERLAY_ALPHA = 0.5


# ------------------------------------------------------------------------------------------ planning

@dataclass
class Job:
    """One input stack and the files it produces.

    Args:
        stack: the input's header.
        output: mask stack to write.
        probabilities: probability stack to write, or None.
        overlay_dir: folder for overlay PNGs, or None.
        instances: cell instance label stack to write, or None.
    """

    stack: StackInfo
    output: Path
    probabilities: Path | None = None
    overlay_dir: Path | None = None
    instances: Path | None = None

    def overlay_paths(self) -> list[Path]:
        """One PNG per slice: ``<stem>_<page>.png`` (page numbers from 0)."""
        if self.overlay_dir is None:
            return []
        digits = max(3, len(str(self.stack.num_slices - 1)))
        return [self.overlay_dir / f"{self.stack.name}_{k:0{digits}d}.png" for k in range(self.stack.num_slices)]

    def outputs(self) -> list[Path]:
        """Every file this job writes."""
        return ([self.output] + ([self.probabilities] if self.probabilities else [])
                + ([self.instances] if self.instances else []) + self.overlay_paths())


def list_inputs(path: Path) -> list[Path]:
    """The image files of an input: the file itself, or the sorted TIFF/PNG files of a folder.

    Raises:
        UserError: missing path, or a folder without images.
    """
    if not path.exists():
        raise UserError(f"{path}: input not found; check --input")
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise UserError(f"{path}: folder has no TIFF or PNG files; --input takes a stack, an image or a "
                            f"folder of them")
        return files
    return [path]


def read_info(path: Path) -> StackInfo:
    """Header of one input stack, checked for a single slice size and a supported pixel type.

    Raises:
        UserError: unreadable file, pages of different sizes, several image series, or an unsupported dtype.
    """
    stack = stack_info(path)  # also refuses stacks whose pages differ in size
    scale_by_dtype(np.zeros(1, dtype=stack.dtype), source=str(path))  # rejects int32, complex, ... before any work
    return stack


def plan_jobs(input_path: str | Path | None, output: str | Path, *, probabilities: str | Path | None = None,
              overlay_dir: str | Path | None = None, overwrite: bool = False,
              in_channels: int = 1, instances: str | Path | None = None) -> list[Job]:
    """Check the inputs and outputs before any work is done, and pair them.

    Args:
        input_path: a stack/image file, a folder of them, or None for the built-in synthetic stack.
        output: the mask TIFF (file input) or a folder (folder input; created if its parent exists).
        probabilities: like ``output``, for probability stacks; None = not written.
        overlay_dir: folder for overlay PNGs (created if its parent exists); None = not written.
        overwrite: allow replacing existing output files.
        in_channels: channels the model expects.
        instances: like ``output``, for cell instance label stacks; None = not written.

    Returns:
        One :class:`Job` per input stack.

    Raises:
        UserError: any bad input, an existing output without ``overwrite``, or an output in a missing folder.
    """
    output = Path(output)
    prob = Path(probabilities) if probabilities is not None else None
    ovl = Path(overlay_dir) if overlay_dir is not None else None
    inst = Path(instances) if instances is not None else None
    stacks = _read_inputs(input_path, in_channels)
    if input_path is not None and Path(input_path).is_dir():
        jobs = _folder_jobs(Path(input_path), stacks, output, prob, ovl, inst)
    else:
        for path, flag in ((output, "--output"), (prob, "--probabilities"), (inst, "--instances")):
            if path is not None:
                _check_output_file(path, flag)
        jobs = [Job(stacks[0], output, prob, ovl, inst)]
    if ovl is not None:
        if ovl.exists() and not ovl.is_dir():
            raise UserError(f"{ovl}: --overlay must be a folder, but a file has that name")
        if not ovl.parent.is_dir():
            raise UserError(f"{ovl}: --overlay folder's parent {ovl.parent} does not exist; create it first")
    _check_outputs(jobs, overwrite)
    # Folders are made only now, after every check passed, so a rejected run leaves nothing behind.
    for folder in {j.output.parent for j in jobs} | {j.probabilities.parent for j in jobs if j.probabilities} \
            | {j.instances.parent for j in jobs if j.instances} | ({ovl} if ovl is not None else set()):
        folder.mkdir(exist_ok=True)
    return jobs


def _read_inputs(input_path: str | Path | None, in_channels: int) -> list[StackInfo]:
    """The headers of every input stack (the built-in synthetic one for None), channels checked."""
    if input_path is None:
        n, h, w = SYNTHETIC_SHAPE
        stacks = [StackInfo(None, n, h, w, 1, np.dtype(np.uint8))]
    else:
        stacks = [read_info(f) for f in list_inputs(Path(input_path))]
    for stack in stacks:
        # A one-pixel probe: the reader's own channel check and message, before any pixel is read.
        as_image(np.zeros((stack.channels, 1, 1), stack.dtype), stack.path or "synthetic", in_channels)
    return stacks


def _folder_jobs(input_dir: Path, stacks: list[StackInfo], output: Path, prob: Path | None,
                 ovl: Path | None, inst: Path | None = None) -> list[Job]:
    """One job per stack of an input folder, writing into the output folder(s)."""
    stems = [stack.name for stack in stacks]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise UserError(f"{input_dir}: several inputs share the name {dup[0]!r} (e.g. .tif and .png); "
                        f"outputs would collide, rename them")
    out_dir = _output_folder(output, "--output", input_dir)
    prob_dir = _output_folder(prob, "--probabilities", input_dir) if prob else None
    inst_dir = _output_folder(inst, "--instances", input_dir) if inst else None
    return [Job(stack, out_dir / f"{stack.name}.tif", prob_dir / f"{stack.name}.tif" if prob_dir else None, ovl,
                inst_dir / f"{stack.name}.tif" if inst_dir else None)
            for stack in stacks]


def _check_outputs(jobs: list[Job], overwrite: bool) -> None:
    """No output replaces an input, another output, a folder, or (without ``overwrite``) an existing file."""
    inputs = {j.stack.path.resolve() for j in jobs if j.stack.path is not None}
    seen: set[Path] = set()
    for job in jobs:
        for out in job.outputs():
            res = out.resolve()
            if res in inputs:
                raise UserError(f"{out}: output would overwrite an input; choose another output name")
            if res in seen:
                raise UserError(f"{out}: two outputs have this name; give --output, --probabilities and "
                                f"--instances different paths")
            seen.add(res)
            if out.exists() and not overwrite:
                raise UserError(f"{out}: output exists; pass --overwrite to replace it or choose another name")
            if out.exists() and out.is_dir():
                raise UserError(f"{out}: output is a folder; give a file name")


def _check_output_file(path: Path, flag: str) -> None:
    if path.is_dir():
        raise UserError(f"{path}: {flag} is a folder but --input is a single stack; give a .tif file name")
    if path.suffix.lower() not in TIFF_SUFFIXES:
        raise UserError(f"{path}: {flag} must be a TIFF file name ending in .tif or .tiff")
    if not path.parent.is_dir():
        raise UserError(f"{path}: {flag} folder {path.parent} does not exist; create it first")


def _output_folder(path: Path, flag: str, input_dir: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: --input is a folder, so {flag} must be a folder too, but a file has that name")
    if not path.parent.is_dir():
        raise UserError(f"{path}: {flag} folder's parent {path.parent} does not exist; create it first")
    if path.exists() and path.resolve() == input_dir.resolve():
        raise UserError(f"{path}: {flag} is the input folder; choose another folder so inputs are not replaced")
    return path


# ------------------------------------------------------------------------------------------ writing

class _CommitOnExit:
    """Context manager of the atomic writers: ``commit()`` on success, ``abort()`` on any exception."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with write_errors(self.path, cleanup=self.abort):  # disk full, size limit: one line, no temporary left
            if exc is not None:
                raise exc
            self.commit()


class StackWriter(_CommitOnExit):
    """Append 2D pages to a multi-page TIFF under a temporary name; rename into place on success.

    Each page is compressed and written as it arrives (no ImageJ header, see the module docstring), so
    memory never grows with the number of pages. Use as a context manager: leaving it with an exception
    (or calling :meth:`abort`) deletes the temporary file and leaves nothing under the final name.

    Args:
        path: final file name; its folder must exist.
        expected_bytes: uncompressed size of all pages, to choose BigTIFF above 3 GiB.
        compression: ``zlib`` (deflate) or ``none``.
    """

    def __init__(self, path: str | Path, *, expected_bytes: int = 0, compression: str = "zlib"):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        self.path = Path(path)
        self.tmp = temporary_path(self.path)  # UserError when the folder is missing
        self.compression = None if compression == "none" else "zlib"
        self.pages = 0
        self._tif = tifffile.TiffWriter(self.tmp, bigtiff=expected_bytes > BIGTIFF_BYTES)

    def append(self, pages: np.ndarray) -> None:
        """Write one ``(H, W)`` page or a ``(n, H, W)`` batch of pages."""
        pages = pages[None] if pages.ndim == 2 else pages
        for page in pages:
            # metadata=None: no per-page JSON header, so readers see one series of identical pages.
            self._tif.write(np.ascontiguousarray(page), compression=self.compression, metadata=None,
                            photometric="minisblack")
            self.pages += 1

    def commit(self) -> Path:
        """Close, flush to disk and rename to the final name."""
        self._tif.close()
        publish(self.tmp, self.path)
        return self.path

    def close(self) -> None:
        """Close the temporary file without publishing it (:meth:`abort` deletes it later)."""
        self._tif.close()

    def abort(self) -> None:
        """Close and delete the temporary file."""
        with contextlib.suppress(Exception):
            self._tif.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()



class LabelStackWriter(_CommitOnExit):
    """Instance label pages with ids running on through the stack, written as uint16 or uint32 as needed.

    The largest id is known only after the last page, so pages go to a hidden uint32 TIFF as they come.
    :meth:`commit` renames that file when an id passed 65535, else rewrites it page by page (one page in
    memory) as uint16 under the final name: the dtype is always the one :func:`unet.prediction.instances.label_dtype`
    gives for the stack's largest id, never a guess. Atomic like :class:`StackWriter`.

    Args:
        path: final file name; its folder must exist.
        pixels: pixels of the whole stack (chooses BigTIFF).
        compression: ``zlib`` or ``none``.
    """

    def __init__(self, path: str | Path, *, pixels: int = 0, compression: str = "zlib"):
        self.path, self.pixels, self.compression = Path(path), pixels, compression
        self.max_id = 0
        self._wide = StackWriter(self.path, expected_bytes=pixels * 4, compression=compression)

    def append(self, labels: np.ndarray) -> None:
        """Add one slice's labels (0 = membrane, 1..n = cells); its ids are shifted past the earlier slices'."""
        n = int(labels.max(initial=0))
        try:
            label_dtype(self.max_id + n)
        except ValueError as e:
            raise UserError(f"{self.path}: {e}; the stack has too many cells for one label stack") from None
        self._wide.append(np.where(labels > 0, labels + self.max_id, 0).astype(np.uint32))
        self.max_id += n

    def commit(self) -> Path:
        """Rename (uint32) or narrow to uint16 and rename; the hidden uint32 file is gone afterwards."""
        if label_dtype(self.max_id) == np.uint32:
            return self._wide.commit()
        self._wide.close()
        try:
            with StackWriter(self.path, expected_bytes=self.pixels * 2, compression=self.compression) as narrow, \
                    tifffile.TiffFile(self._wide.tmp) as wide:
                for page in wide.pages:
                    narrow.append(page.asarray().astype(np.uint16))
        finally:
            self._wide.abort()
        return self.path

    def abort(self) -> None:
        self._wide.abort()


def _write_png_atomic(path: Path, rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG")


# ------------------------------------------------------------------------------------------ prediction

def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB picture of a slice with its predicted membranes (mask == 0) in semi-transparent red.

    Args:
        image: ``(C, H, W)`` float in [0, 1]; 3 channels are shown as RGB, otherwise channel 0 as grey.
        mask: ``(H, W)`` uint8, 0 = membrane.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    if image.shape[0] == 3:
        rgb = np.moveaxis(image, 0, -1).astype(np.float32)
    else:
        grey = image[0].astype(np.float32)
        # Contrast stretch for display only: 16-bit EM often fills a small part of its range.
        lo, hi = np.percentile(grey, (0.5, 99.5))
        grey = np.clip((grey - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(grey)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb = rgb * 255
    membrane = mask == 0
    rgb[membrane] = (1 - OVERLAY_ALPHA) * rgb[membrane] + OVERLAY_ALPHA * OVERLAY_RGB
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def iter_job_pages(stack: StackInfo, batch: int) -> Iterator[np.ndarray]:
    """Raw pages of a job's input in chunks of ``batch`` slices: ``(b, H, W)`` or ``(b, C, H, W)``."""
    if stack.path is None:
        images, _ = make_synthetic_em(stack.num_slices, stack.height, stack.width, seed=0)
        yield from iter_chunks(images, batch)
        return
    yield from iter_pages(stack.path, batch)


def predict_pages(model: torch.nn.Module, dev, chunks: Iterable[np.ndarray], *, source: str = "input",
                  options: TilingOptions | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Predict slice by slice, holding one chunk of raw pages at a time (the per-slice path).

    One :func:`~unet.prediction.predictor.predict_probabilities` per slice, so tiles are batched only within a slice;
    ``infer.py`` runs :class:`unet.prediction.pipeline.StackPredictor` instead, whose masks equal these (tested).

    Args:
        model: a UNet on ``dev.device`` (eval mode is enforced by the predictor).
        dev: the :class:`~unet.device.DeviceSetup`.
        chunks: raw pages ``(b, H, W)`` or ``(b, C, H, W)`` in uint8, uint16 or float (e.g. from ``iter_pages``).
        source: file name for error messages.
        options: whole-slice tiling options for :func:`unet.prediction.predictor.predict_probabilities`.

    Returns:
        An iterator of ``(image, mask, probability)`` per slice: the [0, 1] ``(C, H, W)`` float32 input,
        the uint8 ``(H, W)`` mask (255 = cell) and the float32 ``(H, W)`` class-1 probability.
    """
    for chunk in chunks:
        for raw in chunk:
            image = as_image(raw, source, None)  # predict_probabilities checks the channels
            probs = predict_probabilities(model, image, dev, options)
            mask = mask_from_probabilities(probs).cpu().numpy()
            yield image, mask, probs[1].float().cpu().numpy()


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
            _write_png_atomic(self.overlay_paths[k], overlay(image, mask))
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


def run_job(job: Job, model: torch.nn.Module, dev, *, read_batch: int = 8, prob_dtype: str = "float32",
            compression: str = "zlib", progress=None, options: TilingOptions | None = None,
            instance_options: InstanceOptions | None = None, predictor: StackPredictor | None = None) -> list[Path]:
    """Predict one input stack and write its outputs atomically.

    Args:
        job: from :func:`plan_jobs`.
        model: a UNet (or Ensemble) on ``dev.device``.
        dev: the device setup.
        read_batch: input pages read per chunk (memory scales with it, not with the stack depth).
        prob_dtype: ``float32`` or ``uint8`` (probability x 255, rounded) for the probability stack.
        compression: ``zlib`` or ``none`` for the TIFF outputs.
        progress: a tqdm bar to advance by one per slice, or None.
        options: whole-slice tiling options (tile batches span slices, see :mod:`unet.prediction.pipeline`).
        instance_options: seeded-watershed settings for ``job.instances`` (None: the defaults).
        predictor: a :class:`~unet.prediction.pipeline.StackPredictor` to reuse (None: one of ``model``, ``dev``, ``options``).

    Returns:
        The files written.
    """
    if prob_dtype not in PROB_DTYPES:
        raise ValueError(f"prob_dtype must be one of {PROB_DTYPES}, got {prob_dtype!r}")
    predictor = predictor or StackPredictor(model, dev, options)
    sink = None
    try:
        with contextlib.ExitStack() as writers:
            sink = _JobSink(job, _open_writers(job, writers, prob_dtype, compression), prob_dtype,
                            instance_options or InstanceOptions(), progress)
            count = predictor.run(iter_job_pages(job.stack, read_batch), sink, source=sink.source,
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


def run_inference(model: torch.nn.Module, dev, jobs: list[Job], *, read_batch: int = 8,
                  prob_dtype: str = "float32", compression: str = "zlib", show_progress: bool = True,
                  options: TilingOptions | None = None, instance_options: InstanceOptions | None = None,
                  forward=None, warm_up: bool | None = None) -> RunResult:
    """Run :func:`run_job` for every job with one progress bar over all slices (stderr).

    Args:
        model: a UNet (or Ensemble) on ``dev.device``.
        dev: the device setup.
        jobs: from :func:`plan_jobs`.
        read_batch, prob_dtype, compression, options, instance_options: as for :func:`run_job`.
        show_progress: draw the tqdm bar.
        forward: called instead of ``model`` on the tiles (e.g. ``torch.compile(model)``).
        warm_up: one untimed forward first (kernel choice, compilation); None = off CPU or with ``forward``.

    Returns:
        A :class:`RunResult` (``seconds`` excludes the warm-up, which is ``warmup_seconds``).
    """
    predictor = StackPredictor(model, dev, options, forward=forward)
    result = RunResult()
    if jobs and (warm_up if warm_up is not None else (dev.type != "cpu" or forward is not None)):
        start = time.perf_counter()
        predictor.warm_up(jobs[0].stack.height, jobs[0].stack.width)
        result.warmup_seconds = time.perf_counter() - start
    total = sum(j.stack.num_slices for j in jobs)
    start = time.perf_counter()
    with tqdm(total=total, unit="slice", desc="infer", file=sys.stderr, disable=not show_progress,
              dynamic_ncols=True) as bar:
        for job in jobs:
            result.outputs += run_job(job, model, dev, read_batch=read_batch, prob_dtype=prob_dtype,
                                      compression=compression, progress=bar, instance_options=instance_options,
                                      predictor=predictor)
            result.slices += job.stack.num_slices
    dev.synchronize()
    result.seconds = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------ command line

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Arguments of ``python infer.py``."""
    parser = argparse.ArgumentParser(
        prog="infer.py", add_help=add_help, formatter_class=HelpFormatter,
        description="Segment EM image stacks with a trained UNet checkpoint, or export it for deployment.\n\n"
                    "  python infer.py --ckpt model.pt --input stack.tif --output masks.tif\n"
                    "  python infer.py --ckpt model.pt --input folder/ --output masks/ --overlay overlays/\n"
                    "  python infer.py --ckpt fold0.pt fold1.pt fold2.pt --input stack.tif --output masks.tif\n"
                    "  python infer.py --ckpt model.pt --export model.pt2\n\n"
                    "Masks: uint8, 255 = cell interior, 0 = membrane, one page per input slice.")
    parser.add_argument("--ckpt", required=True, nargs="+",
                        help="checkpoint written by train.py; several = an ensemble averaging their probabilities")
    parser.add_argument("--input", default=None,
                        help="multi-page TIFF (plain, ImageJ, OME), single TIFF/PNG, or a folder of them; "
                             "None = the built-in synthetic stack of 4 slices of 256x256")
    parser.add_argument("--output", default=None,
                        help="mask TIFF to write (a folder when --input is a folder)")
    parser.add_argument("--probabilities", default=None,
                        help="also write the cell-interior probability stack here (a folder for folder input)")
    parser.add_argument("--prob-dtype", default="float32", choices=PROB_DTYPES,
                        help="probability pixels: float32 in [0, 1], or uint8 scaled 0..255")
    parser.add_argument("--overlay", default=None, metavar="DIR",
                        help="write one PNG per slice with predicted membranes drawn in red over the input")
    parser.add_argument("--compression", default="zlib", choices=COMPRESSIONS,
                        help="TIFF compression of the outputs (zlib = deflate, read by Fiji, tifffile, Pillow)")
    parser.add_argument("--read-batch", type=argparse_type(_positive_int), default=8,
                        help="input pages read at a time (host memory scales with this, not the stack depth)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--export", default=None, metavar="PATH",
                        help="export the model instead: .pt2 = torch.export program with a dynamic batch "
                             "dimension at --tile-size (default 572 'valid' / 512 'same'), .onnx = ONNX")
    add_options(parser, TilingOptions)
    g = [grp for grp in parser._action_groups if grp.title == "speed"][0]
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model for the tile shape (start-up cost; pays off on long stacks)")
    parser.add_argument("--instances", default=None, metavar="OUT.tif",
                        help="also write a label stack: one id per cell, unique over the stack, 0 = membrane; "
                             "uint16, or uint32 above 65535 cells (a folder for folder input); settings below")
    add_options(parser, InstanceOptions)
    add_options(parser, DeviceOptions)
    return parser


def main(args: argparse.Namespace) -> RunResult | Path:
    """Run ``infer.py``: export (``--export``) or predict the input stacks.

    Returns:
        The exported file's path, or a :class:`RunResult`.
    """
    if args.export is not None and (args.input is not None or args.output is not None):
        raise UserError("--export writes a model, not masks; run it without --input/--output")
    if args.export is None and args.output is None:
        raise UserError("--output is required (the mask TIFF to write), or pass --export PATH")
    if args.export is not None and len(args.ckpt) > 1:
        raise UserError("--export takes one checkpoint; export the members of an ensemble one by one")
    inst_options = options_from(args, InstanceOptions)
    start = time.perf_counter()
    model = load_ensemble(args.ckpt)[0]  # the UNet itself for one checkpoint

    if args.export is not None:
        path = export_model(model, args.export, tile_size=args.tile_size, overwrite=args.overwrite)
        print(f"exported {path} ({path.stat().st_size / 2 ** 20:.1f} MiB)")
        return path

    jobs = plan_jobs(args.input, args.output, probabilities=args.probabilities, overlay_dir=args.overlay,
                     overwrite=args.overwrite, in_channels=model.config.in_channels, instances=args.instances)
    dev = setup_device(args.device, amp=args.amp, amp_dtype=args.amp_dtype)
    model = dev.prepare_model(model)
    options = options_from(args, TilingOptions)
    options = dataclasses.replace(options, memory_budget_mb=options.memory_budget_mb or free_memory_budget_mb(dev))
    forward = torch.compile(model, dynamic=False) if args.compile else None
    what = "built-in synthetic stack" if args.input is None else args.input
    members = f", ensemble of {len(args.ckpt)} checkpoints" if len(args.ckpt) > 1 else ""
    print(f"predicting {sum(j.stack.num_slices for j in jobs)} slices from {what} on {dev.name()} "
          f"({dev.type}, {dev.amp_name}{members})", file=sys.stderr)
    startup = time.perf_counter() - start
    result = run_inference(model, dev, jobs, read_batch=args.read_batch, prob_dtype=args.prob_dtype,
                           compression=args.compression, show_progress=not args.no_progress,
                           options=options, instance_options=inst_options, forward=forward)
    result.startup_seconds = startup
    _report(jobs, args, result)
    return result


def _report(jobs: list[Job], args: argparse.Namespace, result: RunResult) -> None:
    """What was written, and the timings (start-up and warm-up apart from the streaming run)."""
    for job in jobs:
        extra = [p for p in (job.probabilities, job.instances) if p is not None]
        print(f"wrote {job.output}" + "".join(f" and {p}" for p in extra))
    if args.overlay:
        print(f"wrote {sum(len(j.overlay_paths()) for j in jobs)} overlays to {args.overlay}")
    print(f"start-up {result.startup_seconds:.2f} s (checkpoint, device), warm-up {result.warmup_seconds:.2f} s")
    print(f"done: {result.slices} slices in {result.seconds:.2f} s ({result.slices_per_s:.2f} slices/s)")
