"""``python infer.py``: the parser (built from the option dataclasses) and ``main``, which loads the checkpoint(s),
plans the jobs and runs :func:`unet.prediction.stacks.run_inference`. Programs (``.pt2``/``.onnx``) are written
by ``export.py`` (:mod:`unet.cli.export`)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from unet.atomic import file_sha256
from unet.cli.common import CheckpointArgs, HelpFormatter, add_options, options_from
from unet.device import DeviceOptions, PrecisionOptions, prediction_device
from unet.host_memory import keep_freed_memory
from unet.distributed import broadcast_object, env_info, process_group, rank0_printer
from unet.errors import UserError
from unet.io.volumes import VolumeOptions
from unet.prediction.block_instances import StitchOptions
from unet.prediction.ensemble import load_ensemble
from unet.prediction.instances import InstanceOptions
from unet.prediction.jobs import Job, plan_jobs
from unet.prediction.openvino_forward import OPENVINO_PRECISIONS, openvino_forward, openvino_version
from unet.prediction.predictor import free_memory_budget_mb
from unet.prediction.stacks import InferOptions, RunResult, run_inference
from unet.prediction.tiling import TilingOptions


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Arguments of ``python infer.py``."""
    parser = argparse.ArgumentParser(
        prog="infer.py", add_help=add_help, formatter_class=HelpFormatter,
        description="Segment EM image stacks with a trained UNet checkpoint.\n\n"
                    "  python infer.py --ckpt model.pt --input stack.tif --output masks.tif\n"
                    "  python infer.py --ckpt model.pt --input folder/ --output masks/ --overlay overlays/\n"
                    "  python infer.py --ckpt fold0.pt fold1.pt fold2.pt --input stack.tif --output masks.tif\n"
                    "  python infer.py --ckpt model.pt --input volume.zarr/raw --output pred.ome.zarr\n"
                    "  python infer.py --ckpt model.pt --input data.h5/volumes/raw --output pred.h5/masks\n\n"
                    "Masks: uint8, one page per input slice: 255 = cell interior, 0 = membrane (two-class\n"
                    "models); the class map 0..K-1 and, with --probabilities, all K class probabilities\n"
                    "(K-class models).\n"
                    "Deployable programs: python export.py --format pt2|onnx --ckpt model.pt --output model.pt2")
    add_options(parser, CheckpointArgs)
    add_options(parser, InferOptions, skip=("compile", "backend", "tile_plan", "instances"))
    add_options(parser, VolumeOptions)
    add_options(parser, TilingOptions)
    # --compile, --backend and --tile-plan join the "speed" group
    add_options(parser, InferOptions, only=("compile", "backend", "tile_plan", "instances"))
    add_options(parser, InstanceOptions)
    add_options(parser, StitchOptions)
    add_options(parser, DeviceOptions)
    add_options(parser, PrecisionOptions)
    return parser


def main(args: argparse.Namespace) -> RunResult:
    """Run ``infer.py``: predict the input stacks.

    Returns:
        A :class:`~unet.prediction.stacks.RunResult`.

    Raises:
        UserError: no checkpoint, ``--export`` (moved to export.py), no ``--output``, or any bad input.
    """
    settings = options_from(args, InferOptions)
    ckpts = options_from(args, CheckpointArgs).ckpt
    if not ckpts:
        raise UserError("the following arguments are required: --ckpt")
    if settings.export is not None:
        raise UserError(f"--export: infer.py no longer writes programs; run python export.py --format pt2|onnx "
                        f"--ckpt {' '.join(map(str, ckpts))} --output {settings.export}")
    if settings.output is None:
        raise UserError("--output is required (the mask TIFF or .zarr/.h5 volume to write)")
    inst_options = options_from(args, InstanceOptions)  # checked before the checkpoint loads
    stitch = options_from(args, StitchOptions)
    start = time.perf_counter()
    dist = env_info()
    model = load_ensemble(ckpts)[0]  # the UNet itself for one checkpoint
    jobs = plan_jobs(settings.input, settings.output, probabilities=settings.probabilities,
                     overlay_dir=settings.overlay, overwrite=settings.overwrite,
                     in_channels=model.config.in_channels, instances=settings.instances,
                     volume=options_from(args, VolumeOptions), resume=settings.resume, processes=dist.world_size,
                     num_classes=model.config.num_classes)
    dev = prediction_device(options_from(args, DeviceOptions), options_from(args, PrecisionOptions).precision,
                            dist.local_rank)
    # Before the tiles, canvases and blocks allocate anything large (unet.host_memory says why).
    allocator = keep_freed_memory() if dev.type == "cpu" and settings.host_allocator == "auto" else None
    model = dev.prepare_model(model)
    say = rank0_printer(dist)
    with process_group(dist, dev.backend, dev.device):
        options = _tiling(args, dev)
        forward = _forward(model, dev, settings)
        what = "built-in synthetic stack" if settings.input is None else settings.input
        members = f", ensemble of {len(ckpts)} checkpoints" if len(ckpts) > 1 else ""
        members += f", {dist.world_size} processes" if dist.distributed else ""
        members += f", {settings.backend} {openvino_version()}" if settings.backend == "openvino" else ""
        say(f"predicting {sum(j.stack.num_slices for j in jobs)} slices from {what} on {dev.name()} "
            f"({dev.type}, {dev.amp_name}{members})", file=sys.stderr)
        if allocator is not None:
            say(allocator)  # stdout, with the other figures: stderr holds the start line and errors only
        startup = time.perf_counter() - start
        quiet = settings if dist.is_main else dataclasses.replace(settings, no_progress=True)  # one bar: rank 0's
        result = run_inference(model, dev, jobs, quiet, options=options, instance_options=inst_options,
                               forward=forward, identity=_run_identity(jobs, ckpts, dev), dist=dist, stitch=stitch)
    result.startup_seconds = startup
    if dist.is_main:
        _report(jobs, settings, result)
    return result


def _forward(model: torch.nn.Module, dev, settings: InferOptions):
    """What runs the tiles instead of the model itself: torch.compile's graph, OpenVINO, or None (the model)."""
    if settings.backend == "torch":
        return torch.compile(model, dynamic=False) if settings.compile else None
    if settings.compile:
        raise UserError("--compile is torch's compiler and --backend openvino compiles the model itself: drop one")
    if dev.type != "cpu":
        raise UserError(f"--backend openvino runs on the CPU, and this run's device is {dev.type}: add --device cpu "
                        f"or drop --backend")
    if dev.amp_name not in OPENVINO_PRECISIONS:
        raise UserError(f"--backend openvino runs fp32 or bf16, not {dev.amp_name}")
    if openvino_version() is None:
        raise UserError("--backend openvino needs OpenVINO, which is not installed: pip install openvino")
    return openvino_forward(model, dev.amp_name, torch.get_num_threads())


def _tiling(args: argparse.Namespace, dev) -> TilingOptions:
    """The tiling options, the memory budget filled in from the free device memory: rank 0's on every rank, since
    the budget can decide the tile size and every rank must tile the volume alike."""
    options = options_from(args, TilingOptions)
    budget = broadcast_object(options.memory_budget_mb or free_memory_budget_mb(dev))
    return dataclasses.replace(options, memory_budget_mb=budget)


def _run_identity(jobs: list[Job], ckpts: tuple[str, ...], dev) -> dict | None:
    """What a block-wise run's ``--resume`` must find unchanged besides input and tiling: the checkpoints' bytes
    (SHA-256; a retrained best.pt under the same name is another model) and the precision. None when no job is
    block-wise (hashing a checkpoint costs a read of it)."""
    if not any(job.blockwise for job in jobs):
        return None
    return {"checkpoints": [file_sha256(c) for c in ckpts], "precision": dev.amp_name}


def _report(jobs: list[Job], settings: InferOptions, result: RunResult) -> None:
    """What was written, and the timings (start-up and warm-up apart from the streaming run)."""
    if result.blocks:
        by_rank = result.blocks_by_rank
        print(f"blocks: {result.blocks - result.blocks_skipped} of {result.blocks} predicted"
              + (f" ({result.blocks_skipped} found complete by --resume)" if result.blocks_skipped else "")
              + (f"; by rank: {', '.join(map(str, by_rank))}" if len(by_rank) > 1 else ""))
    for job in jobs:
        extra = [p for p in (job.probabilities, job.instances) if p is not None]
        print(f"wrote {job.output}" + "".join(f" and {p}" for p in extra))
    if settings.overlay:
        print(f"wrote {sum(len(j.overlay_paths()) for j in jobs)} overlays to {settings.overlay}")
    for plan in result.plans:
        print(f"tile plan {plan}")
    print(f"start-up {result.startup_seconds:.2f} s (checkpoint, device), warm-up {result.warmup_seconds:.2f} s")
    print(f"done: {result.slices} slices in {result.seconds:.2f} s ({result.slices_per_s:.2f} slices/s)")
