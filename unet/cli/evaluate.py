"""``evaluate.py`` / ``unet-evaluate``: the parser (built from the options dataclasses) and :func:`main`.

One checkpoint is evaluated on its own fold; several (``--ckpt a b c`` or ``--cv-dir``) each on theirs, plus a
cross-validation table; ``--ensemble`` scores their mean probability once. The work is
:func:`unet.evaluation.checkpoints.evaluate_checkpoint`'s; this module turns flags into options, prints the
tables on rank 0 and writes ``--output``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from unet.atomic import atomic_write
from unet.cli.common import CheckpointArgs, HelpFormatter, add_options, options_from
from unet.data.datasets import DataOptions
from unet.device import DeviceOptions, PrecisionOptions, prediction_device
from unet.distributed import env_info, process_group, rank0_printer
from unet.errors import UserError
from unet.evaluation.checkpoints import EvaluateOptions, evaluate_checkpoint, find_checkpoints
from unet.evaluation.tables import CV_METRICS, STD_KIND, cv_markdown, cv_summary, fmt, format_table
from unet.io.volumes import VolumeOptions
from unet.prediction.instances import InstanceOptions
from unet.prediction.tiling import TilingOptions
from unet.run_log import jsonable


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The ``evaluate.py`` / ``unet-evaluate`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="evaluate.py", add_help=add_help, formatter_class=HelpFormatter,
        description="Evaluate UNet checkpoints on whole slices at native resolution.\n\n"
                    "One checkpoint: metrics on its validation fold (fold, folds, scheme, seed and data\n"
                    "directory come from the checkpoint unless given here). Several checkpoints (--ckpt a b c\n"
                    "or --cv-dir): each on its own fold, plus mean ± sample std (ddof=1) over folds; with\n"
                    "--ensemble: their mean probability, scored once (they must share data and fold).\n"
                    "Metrics include the ISBI challenge's thinned V_Rand / V_Info and the cell-instance scores.\n"
                    "Runs under torchrun: slices are sharded over ranks and the metrics summed exactly.",
        epilog="examples:\n"
               "  python evaluate.py --ckpt results/fold0/best.pt --output fold0.json\n"
               "  python evaluate.py --cv-dir results/ --output cv.json\n"
               "  python evaluate.py --ckpt seed0/best.pt seed1/best.pt --ensemble --tta\n"
               "  torchrun --nproc_per_node=8 evaluate.py --ckpt best.pt --data-dir data/isbi2012")
    source = parser.add_mutually_exclusive_group(required=True)  # --ckpt or --cv-dir, exactly one
    add_options(source, CheckpointArgs)
    add_options(source, EvaluateOptions, only=("cv_dir",))
    add_options(parser, EvaluateOptions, skip=("cv_dir",))
    add_options(parser, DataOptions, inherit="the checkpoint")
    add_options(parser, VolumeOptions, inherit="the checkpoint")
    add_options(parser, DeviceOptions)
    add_options(parser, PrecisionOptions)
    add_options(parser, TilingOptions, skip=("memory_budget_mb",))
    add_options(parser, InstanceOptions)
    return parser


def _checkpoint_paths(ckpt: tuple[str, ...], options: EvaluateOptions, data: DataOptions) -> list[Path]:
    """The checkpoints to evaluate, checked before any slow work."""
    if options.output is not None and not Path(options.output).resolve().parent.is_dir():
        raise UserError(f"--output {options.output}: folder {Path(options.output).parent} does not exist")
    paths = find_checkpoints(options.cv_dir) if options.cv_dir else [Path(p) for p in ckpt]
    if len(paths) > 1 and data.fold is not None and not options.ensemble:
        raise UserError("--fold cannot be combined with several checkpoints: each one is evaluated on its own "
                        "fold; drop --fold (or pass a single --ckpt, or --ensemble)")
    for p in paths:  # fail before any slow work if one file is missing
        if not p.is_file():
            raise UserError(f"checkpoint {p} does not exist; check --ckpt")
    return paths


def _cv_record(runs: list[dict], say) -> dict[str, Any]:
    """Cross-validation summary of several checkpoints' records (printed as a Markdown table)."""
    labels = [str(r["fold"]["fold"]) if r["fold"]["fold"] is not None else "all" for r in runs]
    per_fold = [r["metrics"] for r in runs]
    summary = cv_summary(per_fold)
    table = cv_markdown(labels, per_fold, summary)
    say(f"cross-validation over {len(runs)} checkpoints (± = {STD_KIND}):")
    say(table)
    folds = [r["fold"]["fold"] for r in runs]
    if len(set(folds)) != len(folds):
        say("note: several checkpoints were evaluated on the same fold")
    summary["markdown"] = table
    summary["folds"] = labels
    return summary


def _say_record(record: dict, per_image: bool, say) -> None:
    """One checkpoint's (or ensemble's) metrics table, after its per-slice lines when asked."""
    if per_image and record.get("per_image"):
        for row in record["per_image"]:
            say(f"  {row['name']}: " + "  ".join(f"{k} {fmt(row[k])}" for k in CV_METRICS if k in row))
    say(format_table(record["metrics"]))
    say(f"({record['seconds']:.1f} s)")
    say("")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``evaluate.py``: evaluate, print the table(s) on rank 0, write ``--output``.

    Args:
        args: parsed :func:`get_args_parser` arguments.

    Returns:
        The result record written to ``--output`` (the same on every rank).
    """
    start = time.perf_counter()
    options, data = options_from(args, EvaluateOptions), options_from(args, DataOptions)
    settings = {"data": data, "tiling": options_from(args, TilingOptions),
                "instances": options_from(args, InstanceOptions), "volume": options_from(args, VolumeOptions)}
    dist = env_info()
    paths = _checkpoint_paths(options_from(args, CheckpointArgs).ckpt, options, data)
    device = options_from(args, DeviceOptions)
    dev = prediction_device(device, options_from(args, PrecisionOptions).precision, dist.local_rank)
    say = rank0_printer(dist)
    with process_group(dist, dev.backend, dev.device):
        say(f"device:     {dev.type} ({dev.name()}), {dev.amp_name}, {dist.world_size} process(es), "
            f"{torch.get_num_threads()} CPU thread(s) per process")
        cache: dict = {}
        runs = []
        for group in ([paths] if options.ensemble else [[p] for p in paths]):
            runs.append(evaluate_checkpoint(group, options, dev, dist, cache=cache, say=say, **settings))
            _say_record(runs[-1], options.per_image, say)
        device_record = {"type": dev.type, "name": dev.name(), "amp": dev.amp_name, "world_size": dist.world_size}
        if len(runs) == 1:
            out = {**runs[0], "device": device_record, "seconds": time.perf_counter() - start}
        else:
            out = {"runs": runs, "cv": _cv_record(runs, say), "device": device_record,
                   "seconds": time.perf_counter() - start}
        out = jsonable(out)
        if options.output is not None and dist.is_main:
            text = json.dumps(out, indent=2) + "\n"
            atomic_write(options.output, lambda f: f.write(text.encode("utf-8")))
            say(f"wrote {options.output}")
        sys.stdout.flush()
        return out
