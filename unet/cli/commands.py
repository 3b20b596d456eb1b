"""Console-script launchers (``unet-train``, ``unet-evaluate``, ``unet-infer``, ``unet-export``; also train.py,
evaluate.py, infer.py and export.py): the top of the import tree, which nothing in the package imports."""
from __future__ import annotations

from typing import Sequence

from unet.export import bioimageio

from unet.evaluation import evaluate as evaluation

from unet.prediction import stacks as inference

from unet.cli import train as training
from unet.cli.common import run


def train(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-train``."""
    return run(training.main, training.get_args_parser(), argv)


def evaluate(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-evaluate``."""
    return run(evaluation.main, evaluation.get_args_parser(), argv)


def infer(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-infer``."""
    return run(inference.main, inference.get_args_parser(), argv)


def export(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-export`` (a BioImage Model Zoo package)."""
    return run(bioimageio.main, bioimageio.get_args_parser(), argv)
