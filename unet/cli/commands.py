"""Console-script launchers (``unet-train``, ``unet-evaluate``, ``unet-infer``, ``unet-export``; also train.py,
evaluate.py, infer.py and export.py): the top of the import tree, which nothing in the package imports."""
from __future__ import annotations

from typing import Sequence

from unet.cli import evaluate as evaluate_command
from unet.cli import export as export_command
from unet.cli import infer as infer_command
from unet.cli import train as train_command
from unet.cli.common import run


def train(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-train``."""
    return run(train_command.main, train_command.get_args_parser(), argv)


def evaluate(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-evaluate``."""
    return run(evaluate_command.main, evaluate_command.get_args_parser(), argv)


def infer(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-infer``."""
    return run(infer_command.main, infer_command.get_args_parser(), argv)


def export(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-export`` (a BioImage Model Zoo package, a .pt2 program or ONNX)."""
    return run(export_command.main, export_command.get_args_parser(), argv)
