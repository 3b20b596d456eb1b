"""Console-script launchers (``unet-train``, ``unet-evaluate``, ``unet-infer``; also train.py, evaluate.py and
infer.py): the top of the import tree, which nothing in the package imports."""
from __future__ import annotations

from typing import Sequence

from unet import evaluation, inference, training
from unet.cli import run


def train(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-train``."""
    return run(training.main, training.get_args_parser(), argv)


def evaluate(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-evaluate``."""
    return run(evaluation.main, evaluation.get_args_parser(), argv)


def infer(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-infer``."""
    return run(inference.main, inference.get_args_parser(), argv)
