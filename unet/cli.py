"""Command-line plumbing shared by train.py / evaluate.py / infer.py and the unet-* console scripts."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from unet.errors import UserError


def run(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and call ``main(args)``; a UserError becomes one line on stderr and exit status 2."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except UserError as e:
        message = " ".join(str(e).split())  # always one line, whatever the message held
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    return 0


def train(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-train``."""
    from unet import training
    return run(training.main, training.get_args_parser(), argv)


def evaluate(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-evaluate``."""
    from unet import evaluation
    return run(evaluation.main, evaluation.get_args_parser(), argv)


def infer(argv: Sequence[str] | None = None) -> int:
    """Console script ``unet-infer``."""
    from unet import inference
    return run(inference.main, inference.get_args_parser(), argv)
