"""Inference jobs: which input stacks become which output files, every path checked before any work is done.

:func:`plan_jobs` pairs each input stack (a file, a folder of them, a chunked volume, or the built-in synthetic
stack) with its mask, probability, instance and overlay outputs, and refuses bad inputs and outputs with one
line each (missing input or key, unsupported pixels, an output that exists, would replace an input, or lies in
a missing folder); :func:`iter_job_pages` reads a job's input a few pages at a time.

Inputs and outputs are told apart by their paths: a ``.tif``/``.tiff``/``.png`` file or a plain folder is read
and written as before; a path into a zarr, N5 or HDF5 container (:mod:`unet.io.paths`: ``v.zarr/raw``,
``data.h5/volumes/raw``) is a chunked volume, read lazily with :func:`unet.io.volumes.open_volume` and written
(zarr/OME-Zarr and HDF5 only) with :mod:`unet.io.volume_stacks`.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unet.data.synthetic import make_synthetic_em
from unet.errors import UserError
from unet.io.images import (IMAGE_SUFFIXES, TIFF_SUFFIXES, StackInfo, as_image, check_finite, iter_chunks, iter_pages,
                            list_images, scale_by_dtype, stack_info)
from unet.io.paths import parse_volume_path
from unet.io.volumes import VolumeOptions
from unet.prediction.block_records import MANIFEST, records_path

SYNTHETIC_SHAPE = (4, 256, 256)  # slices, height, width of the built-in stack used without --input
CHUNKED_KINDS = ("zarr", "n5", "hdf5")  # container kinds read as volumes
WRITTEN_KINDS = ("zarr", "hdf5")  # container kinds written (create_volume)


@dataclass
class Job:
    """One input stack and the files it produces.

    Args:
        stack: the input's header.
        output: mask stack to write.
        probabilities: probability stack to write, or None.
        overlay_dir: folder for overlay PNGs, or None.
        instances: cell instance label stack to write, or None.
        volume: how to open a chunked input (its ``stack.path`` is the volume path), None for other inputs.
    """

    stack: StackInfo
    output: Path
    probabilities: Path | None = None
    overlay_dir: Path | None = None
    instances: Path | None = None
    volume: VolumeOptions | None = None

    def overlay_paths(self) -> list[Path]:
        """One PNG per slice: ``<stem>_<page>.png`` (page numbers from 0)."""
        if self.overlay_dir is None:
            return []
        digits = max(3, len(str(self.stack.num_slices - 1)))
        return [self.overlay_dir / f"{self.stack.name}_{k:0{digits}d}.png" for k in range(self.stack.num_slices)]

    @property
    def blockwise(self) -> bool:
        """Predicted block by block (:mod:`unet.prediction.volume_jobs`): a chunked volume in, only chunked
        outputs (instances too: stitched across blocks by :mod:`unet.prediction.block_instances`) and no overlays
        (PNGs per slice)."""
        return (self.volume is not None and self.overlay_dir is None
                and all(is_volume_path(p) for p in (self.output, self.probabilities, self.instances) if p is not None))

    def outputs(self) -> list[Path]:
        """Every file this job writes."""
        return ([self.output] + ([self.probabilities] if self.probabilities else [])
                + ([self.instances] if self.instances else []) + self.overlay_paths())


def is_volume_path(path: str | Path) -> bool:
    """True for a path into a zarr, N5 or HDF5 container; False for TIFF/PNG files, plain folders and the rest."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False  # a TIFF/PNG file keeps its own reader and writer, wherever it lies
    try:
        return parse_volume_path(path).kind in CHUNKED_KINDS
    except UserError:
        return False


def _container(path: Path) -> Path:
    """The file or folder an input or output occupies on disk (a volume's container)."""
    return parse_volume_path(path).container if is_volume_path(path) else path


def read_volume_info(spec: str | Path, volume: VolumeOptions) -> StackInfo:
    """Header of a chunked input volume (metadata only), as a stack of its z slices.

    Raises:
        UserError: missing container or key (listing the keys), wrong rank, dtype or axes, bad scale/channel/time.
    """
    with volume.open(str(spec)) as vol:
        channels = vol.shape[1] if vol.axes == "zcyx" else 1
        return StackInfo(Path(vol.name), vol.shape[0], vol.shape[-2], vol.shape[-1], channels, np.dtype(vol.dtype))


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
              in_channels: int = 1, instances: str | Path | None = None,
              volume: VolumeOptions | None = None, resume: bool = False, processes: int = 1,
              num_classes: int = 2) -> list[Job]:
    """Check the inputs and outputs before any work is done, and pair them.

    Args:
        input_path: a stack/image file, a folder of them, a volume path (``v.zarr/raw``, ``d.h5/raw``), or None
            for the built-in synthetic stack.
        output: the mask TIFF or chunked volume (``.zarr``/``.h5`` with an optional key) for a file or volume
            input, a folder for a folder input (created if its parent exists).
        probabilities: like ``output``, for probability stacks; None = not written.
        overlay_dir: folder for overlay PNGs (created if its parent exists); None = not written.
        overwrite: allow replacing existing output files.
        in_channels: channels the model expects.
        instances: like ``output``, for cell instance label stacks; None = not written.
        volume: scale, channel and time point of a volume input (None: the defaults; refused for other inputs).
        resume: finish an interrupted block-wise run (only for block-wise jobs, see :attr:`Job.blockwise`).
        processes: torchrun's world size: several processes share only block-wise jobs into zarr outputs.
        num_classes: classes the model predicts (instances need a two-class membrane/cell model).

    Returns:
        One :class:`Job` per input stack.

    Raises:
        UserError: any bad input, an existing output without ``overwrite``, or an output in a missing folder.
    """
    _check_classes(num_classes, instances)
    output = Path(output)
    prob = Path(probabilities) if probabilities is not None else None
    ovl = Path(overlay_dir) if overlay_dir is not None else None
    inst = Path(instances) if instances is not None else None
    chunked = input_path is not None and is_volume_path(input_path)
    volume = _volume_choices(input_path, volume or VolumeOptions(), chunked)
    stacks = _read_inputs(input_path, in_channels, volume if chunked else None)
    if input_path is not None and not chunked and Path(input_path).is_dir():
        jobs = _folder_jobs(Path(input_path), stacks, output, prob, ovl, inst)
    else:
        for path, flag in ((output, "--output"), (prob, "--probabilities"), (inst, "--instances")):
            if path is not None:
                _check_output_file(path, flag)
        jobs = [Job(stacks[0], output, prob, ovl, inst, volume if chunked else None)]
    if ovl is not None:
        if ovl.exists() and not ovl.is_dir():
            raise UserError(f"{ovl}: --overlay must be a folder, but a file has that name")
        if not ovl.parent.is_dir():
            raise UserError(f"{ovl}: --overlay folder's parent {ovl.parent} does not exist; create it first")
    _check_resume(jobs, overwrite, resume)
    _check_processes(jobs, processes)
    _check_outputs(jobs, overwrite, resume)
    # Folders are made only now, after every check passed, so a rejected run leaves nothing behind. A volume's
    # container is made by its writer, and its folder must exist already (checked above).
    files = [out for j in jobs for out in (j.output, j.probabilities, j.instances)
             if out is not None and not is_volume_path(out)]
    for folder in {out.parent for out in files} | ({ovl} if ovl is not None else set()):
        folder.mkdir(exist_ok=True)
    return jobs


def _volume_choices(input_path: str | Path | None, volume: VolumeOptions, chunked: bool) -> VolumeOptions:
    """``volume`` itself; refused when set for an input that is not a chunked volume (TIFF/PNG keep their reader)."""
    if not chunked and volume != VolumeOptions():
        raise UserError(f"{', '.join(volume.given())}: only for zarr, N5 or HDF5 volume inputs (e.g. volume.zarr/raw), but "
                        f"--input is {input_path or 'not given'}; leave it unset")
    return volume


def _read_inputs(input_path: str | Path | None, in_channels: int, volume: VolumeOptions | None) -> list[StackInfo]:
    """The headers of every input stack (the built-in synthetic one for None), channels checked."""
    if input_path is None:
        n, h, w = SYNTHETIC_SHAPE
        stacks = [StackInfo(None, n, h, w, 1, np.dtype(np.uint8))]
    elif volume is not None:
        stacks = [read_volume_info(input_path, volume)]
        if in_channels == 1 < stacks[0].channels:
            raise UserError(f"{stacks[0].path}: has {stacks[0].channels} channels but the model takes 1; pick one "
                            f"with --channel 0..{stacks[0].channels - 1}")
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


def _check_classes(num_classes: int, instances: str | Path | None) -> None:
    """Cells are the seeded watershed of the cell probability, which only a two-class membrane/cell model gives;
    the classes of a K-class model are not split into objects (connected components of a class map would merge
    every touching object of a class, so no instance meaning is guessed)."""
    if instances is not None and num_classes != 2:
        raise UserError(f"--instances: cells are made from a two-class (membrane, cell) model's cell probability, but "
                        f"this checkpoint predicts {num_classes} classes; drop --instances (--output writes the class "
                        f"map)")


def _check_resume(jobs: list[Job], overwrite: bool, resume: bool) -> None:
    """``--resume`` only for block-wise jobs and not with ``--overwrite``."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite: give one (--resume finishes an interrupted run, --overwrite "
                        "starts over)")
    if resume and not all(job.blockwise for job in jobs):
        raise UserError("--resume: only block-wise runs can be resumed: a zarr/N5/HDF5 --input with .zarr/.h5 "
                        "outputs (--instances too), without --overlay")


def _check_processes(jobs: list[Job], processes: int) -> None:
    """Several processes (torchrun) share the blocks of block-wise jobs, writing zarr only: an HDF5 file has one
    writer at a time (the writer's lock would stop the second rank mid-run, so it is refused up front)."""
    if processes < 2:
        return
    if not all(job.blockwise for job in jobs):
        raise UserError(f"torchrun with {processes} processes: only block-wise runs are shared among processes (a "
                        f"zarr/N5/HDF5 --input with .zarr outputs, --instances too, without --overlay); run one "
                        f"process")
    for job in jobs:
        for path in (job.output, job.probabilities, job.instances):
            if path is not None and parse_volume_path(path).kind == "hdf5":
                raise UserError(f"{path}: HDF5 cannot be written by several processes at once; write OME-Zarr "
                                f"(.zarr) under torchrun, or run one process")


def _interrupted(job: Job) -> Path | None:
    """The records folder of an interrupted block-wise run into this job's outputs, or None."""
    if not job.blockwise:
        return None
    records = records_path(parse_volume_path(job.output).container)
    return records if (records / MANIFEST).is_file() else None


def _check_outputs(jobs: list[Job], overwrite: bool, resume: bool = False) -> None:
    """No output replaces an input, another output, a folder, or (without ``overwrite``) an existing file.

    A volume output occupies its whole container (``out.zarr`` for ``out.zarr/masks``): two outputs cannot share
    one, and ``overwrite`` replaces it whole. An interrupted block-wise run's records count as an existing
    output, which ``resume`` continues (even over an older finished output, replaced at the end).
    """
    for job in jobs:
        records = _interrupted(job)
        if records is not None and not (overwrite or resume):
            raise UserError(f"{job.output}: an interrupted run of this output is recorded in {records}; pass --resume "
                            f"to finish it or --overwrite to start over")
        if records is not None and resume:
            overwrite = True  # the final name is replaced only when the resumed run commits
    inputs = {_container(j.stack.path).resolve() for j in jobs if j.stack.path is not None}
    seen: set[Path] = set()
    for job in jobs:
        for out in job.outputs():
            target = _container(out)
            res = target.resolve()
            if res in inputs:
                raise UserError(f"{out}: output would overwrite an input; choose another output name")
            if res in seen:
                raise UserError(f"{out}: two outputs have this name (or container); give --output, --probabilities "
                                f"and --instances different paths (each chunked output its own .zarr/.h5)")
            seen.add(res)
            if target.exists() and not overwrite:
                raise UserError(f"{target}: output exists; pass --overwrite to replace it or choose another name")
            if target is out and out.exists() and out.is_dir():
                raise UserError(f"{out}: output is a folder; give a file name")


def _check_output_file(path: Path, flag: str) -> None:
    if is_volume_path(path):
        vp = parse_volume_path(path)
        if vp.kind not in WRITTEN_KINDS:
            raise UserError(f"{path}: {flag} cannot be written as {vp.kind.upper()}; chunked outputs are OME-Zarr "
                            f"(.zarr) or HDF5 (.h5)")
        if not vp.container.parent.is_dir():
            raise UserError(f"{path}: {flag} folder {vp.container.parent} does not exist; create it first")
        return
    if path.is_dir():
        raise UserError(f"{path}: {flag} is a folder but --input is a single stack; give a .tif file name")
    if path.suffix.lower() not in TIFF_SUFFIXES:
        raise UserError(f"{path}: {flag} must be a TIFF file name ending in .tif or .tiff, or a chunked volume "
                        f"(out.zarr, out.zarr/key, out.h5/key)")
    if not path.parent.is_dir():
        raise UserError(f"{path}: {flag} folder {path.parent} does not exist; create it first")


def _output_folder(path: Path, flag: str, input_dir: Path) -> Path:
    if is_volume_path(path):
        raise UserError(f"{path}: --input is a folder, so {flag} must be a folder of TIFF stacks; chunked outputs "
                        f"(.zarr, .h5) take one input stack or volume")
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: --input is a folder, so {flag} must be a folder too, but a file has that name")
    if not path.parent.is_dir():
        raise UserError(f"{path}: {flag} folder's parent {path.parent} does not exist; create it first")
    if path.exists() and path.resolve() == input_dir.resolve():
        raise UserError(f"{path}: {flag} is the input folder; choose another folder so inputs are not replaced")
    return path


def iter_job_pages(job: Job, batch: int) -> Iterator[np.ndarray]:
    """Raw pages of a job's input in chunks of ``batch`` slices: ``(b, H, W)`` or ``(b, C, H, W)``."""
    stack = job.stack
    if stack.path is None:
        images, _ = make_synthetic_em(stack.num_slices, stack.height, stack.width, seed=0)
        yield from iter_chunks(images, batch)
        return
    if job.volume is not None:
        yield from iter_volume_pages(str(stack.path), job.volume, batch)
        return
    yield from iter_pages(stack.path, batch)


def iter_volume_pages(spec: str, volume: VolumeOptions, batch: int) -> Iterator[np.ndarray]:
    """A chunked volume's slices, ``batch`` at a time, each batch read on its own (never the whole volume).

    Args:
        spec: the volume path.
        volume: scale, channel and time point.
        batch: slices per chunk (the last may be shorter).

    Returns:
        An iterator of ``(b, H, W)`` or ``(b, C, H, W)`` arrays in the stored dtype.

    Raises:
        UserError: a corrupt chunk (named), or NaN/Inf pixels in a float volume.
    """
    with volume.open(spec) as vol:
        for start in range(0, vol.shape[0], batch):
            pages = vol.read(z=slice(start, start + batch))
            check_finite(pages, spec, start)
            yield pages
