"""Inference jobs: which input stacks become which output files, every path checked before any work is done.

:func:`plan_jobs` pairs each input stack (a file, a folder of them, or the built-in synthetic stack) with its
mask, probability, instance and overlay outputs, and refuses bad inputs and outputs with one line each
(missing input, unsupported pixels, an output that exists, would replace an input, or lies in a missing
folder); :func:`iter_job_pages` reads a job's input a few pages at a time.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unet.data.synthetic import make_synthetic_em
from unet.errors import UserError
from unet.io.images import (TIFF_SUFFIXES, StackInfo, as_image, iter_chunks, iter_pages, list_images, scale_by_dtype,
                            stack_info)

SYNTHETIC_SHAPE = (4, 256, 256)  # slices, height, width of the built-in stack used without --input


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


def iter_job_pages(stack: StackInfo, batch: int) -> Iterator[np.ndarray]:
    """Raw pages of a job's input in chunks of ``batch`` slices: ``(b, H, W)`` or ``(b, C, H, W)``."""
    if stack.path is None:
        images, _ = make_synthetic_em(stack.num_slices, stack.height, stack.width, seed=0)
        yield from iter_chunks(images, batch)
        return
    yield from iter_pages(stack.path, batch)
