"""``train.py`` / ``unet-train``: the parser, built from :class:`unet.training.config.RunConfig`'s fields, and
:func:`main`, which turns the parsed arguments into a RunConfig and calls :func:`run_training`."""
from __future__ import annotations

import argparse

from unet.cli.common import HelpFormatter, add_options, options_from
from unet.data.datasets import DataOptions
from unet.data.labels import LabelOptions
from unet.device import DeviceOptions
from unet.io.volumes import VolumeOptions
from unet.prediction.tiling import TilingOptions
from unet.training.config import TILING_SKIP, RunConfig
from unet.training.trainer import run_training


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """train.py's parser: DataOptions, LabelOptions, VolumeOptions, RunConfig, DeviceOptions and TilingOptions (no
    memory budget)."""
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=HelpFormatter, add_help=add_help,
        description="Train a UNet on EM slices (ISBI 2012 layout, images/+labels/ folders, own TIFF stacks, "
                    "folders or zarr/N5/HDF5 volumes, or the built-in synthetic set).\n"
                    "One device: python train.py ...   Many: torchrun --nproc_per_node=8 train.py ...\n"
                    "Fine-tune: python train.py --init-from best.pt --train-images x.tif --train-labels y.tif ...")
    add_options(p, DataOptions)
    add_options(p, LabelOptions)
    add_options(p, VolumeOptions)
    add_options(p, RunConfig)
    add_options(p, DeviceOptions)
    add_options(p, TilingOptions, skip=TILING_SKIP)
    return p


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run's settings as parsed (derived values are resolved by :func:`run_training`)."""
    return options_from(args, RunConfig, data=options_from(args, DataOptions), labels=options_from(args, LabelOptions),
                        volume=options_from(args, VolumeOptions), device_options=options_from(args, DeviceOptions),
                        tiling=options_from(args, TilingOptions))


def main(args: argparse.Namespace) -> dict:
    """Train (or benchmark) as ``args`` say; returns the final summary (on every rank)."""
    return run_training(run_config(args))
