"""Argparse helpers shared by the train.py / evaluate.py / infer.py parsers (the launchers are in
:mod:`unet.commands`). A leaf: it imports only the small modules whose choices it lists, never a job."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, Sequence

from unet.device import AMP_DTYPES, DEVICE_CHOICES
from unet.distributed import env_info
from unet.errors import UserError
from unet.instances import SEED_METHODS, InstanceOptions
from unet.tiling import BLENDS, TilingOptions


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default and keeps the description's line breaks."""


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """--device, --amp, --amp-dtype: the same spelling in every command."""
    g = parser.add_argument_group("device")
    g.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="auto = Ascend NPU if torch_npu is loaded and one is present, else CUDA, else CPU")
    g.add_argument("--amp", action="store_true", help="mixed precision with torch.autocast on the device")
    g.add_argument("--amp-dtype", "--amp_dtype", default=None, choices=sorted(AMP_DTYPES),
                   help="autocast dtype (default: bf16 where the device supports it, else fp16 with loss scaling)")


def positive_int(text: str) -> int:
    """argparse ``type``: a whole number >= 1, so a bad value fails at parse time, before any work."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse ``type``: a number in [0, 1)."""
    return _bounded_float(text, lambda v: 0 <= v < 1, "in [0, 1)")


def positive_float(text: str) -> float:
    """argparse ``type``: a finite number > 0."""
    return _bounded_float(text, lambda v: v > 0, "a number > 0")


def non_negative_float(text: str) -> float:
    """argparse ``type``: a finite number >= 0."""
    return _bounded_float(text, lambda v: v >= 0, "a number >= 0")


def _bounded_float(text: str, ok: Callable[[float], bool], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not (ok(value) and value < float("inf")):  # NaN and inf fail too
        raise argparse.ArgumentTypeError(f"must be {what}, got {value:g}")
    return value


def add_tiling_args(parser: argparse.ArgumentParser) -> None:
    """--tile-size, --tile-batch, --overlap, --blend, --tta: whole-slice prediction options."""
    g = parser.add_argument_group("whole-slice prediction")
    g.add_argument("--tile-size", type=int, default=None,
                   help="input tile size (default: the tiling with the fewest FLOPs that fits memory)")
    g.add_argument("--tile-batch", type=positive_int, default=4, help="tiles per forward pass")
    g.add_argument("--overlap", type=fraction, default=0.25,
                   help="window overlap fraction for 'same'-padding models ('valid' tiles never overlap)")
    g.add_argument("--blend", default="gaussian", choices=BLENDS,
                   help="weight map for overlapping windows ('same' padding)")
    g.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the 8 flips/rotations (8x the compute)")


def tiling_options(args) -> TilingOptions:
    """The :class:`~unet.tiling.TilingOptions` of parsed :func:`add_tiling_args` flags (or a RunConfig)."""
    return TilingOptions(tile_size=args.tile_size, tile_batch=args.tile_batch, overlap=args.overlap,
                         blend=args.blend, tta=args.tta)


def add_instance_args(parser: argparse.ArgumentParser) -> None:
    """--instance-threshold, --instance-seeds, --instance-h, --instance-smooth, --no-instance-fill.

    The seeded-watershed settings of :class:`~unet.instances.InstanceOptions` (its defaults are the flags'
    defaults), spelled the same in ``evaluate.py`` (instance scores) and ``infer.py`` (``--instances``).
    """
    d = InstanceOptions()
    g = parser.add_argument_group("cell instances (seeded watershed, unet.instances)")
    g.add_argument("--instance-threshold", type=fraction, default=d.threshold,
                   help="a pixel may belong to a cell iff its cell probability is above this")
    g.add_argument("--instance-seeds", default=d.seeds, choices=SEED_METHODS,
                   help="seeds: h-minima of the membrane probability, or h-maxima of the distance transform")
    g.add_argument("--instance-h", type=positive_float, default=d.seed_h,
                   help="h of the seeds' h-minima (probability) or h-maxima (pixels of distance)")
    g.add_argument("--instance-smooth", type=non_negative_float, default=d.smooth,
                   help="Gaussian sigma (px) applied to the probabilities first (0 = none)")
    g.add_argument("--no-instance-fill", action="store_true",
                   help="keep pixels at or below the threshold as membrane (default: flood the membranes too, "
                        "leaving one-pixel lines between cells)")


def instance_options(args) -> InstanceOptions:
    """The :class:`~unet.instances.InstanceOptions` of parsed :func:`add_instance_args` flags."""
    return InstanceOptions(threshold=args.instance_threshold, seeds=args.instance_seeds, seed_h=args.instance_h,
                           smooth=args.instance_smooth, fill=not args.no_instance_fill)


@contextlib.contextmanager
def _muted(quiet: bool):
    """Send stdout and stderr to the null device while ``quiet`` (argparse prints usage and errors itself)."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def run(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and call ``main(args)``; a UserError becomes one line on stderr and exit status 2.

    Under torchrun every rank parses and fails alike, so only rank 0 prints the line (and argparse's usage
    errors); the other ranks exit with the same status silently. A UserError raised on a rank other than 0
    alone is therefore not printed: torchrun's failure summary names that rank and its exit status 2.
    """
    quiet = env_info().rank != 0
    with _muted(quiet):
        args = parser.parse_args(argv)
    try:
        main(args)
    except UserError as e:
        message = " ".join(str(e).split())  # always one line, whatever the message held
        if not quiet:
            print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if not quiet:
            print(f"{parser.prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    return 0
