"""What every command shares: parsers built from option dataclasses (:mod:`unet.options`), the help
formatter, and :func:`run` (parse, call ``main``, one line per UserError). Imports no job."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from unet.distributed import env_info
from unet.errors import UserError
from unet.options import field_default, option, option_fields


@dataclass(frozen=True)
class CheckpointArgs:
    """``--ckpt``, the same in every command that reads checkpoints (each checks how many it takes)."""

    ckpt: tuple[str, ...] = option((), "checkpoint(s) written by train.py; several: an ensemble averaging their "
                                       "probabilities (evaluate.py: one row each unless --ensemble)",
                                   flags="--ckpt", nargs="+", metavar="PATH")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default and keeps the description's line breaks."""

    def _get_help_string(self, action):
        # A help that states its own default (add_options' inherit) gets no second "(default: None)", and a
        # --no-x switch no "(default: True)", which would read as if --no-x were on.
        if "(default:" in (action.help or "") or isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


def add_options(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                inherit: str | None = None) -> None:
    """Add one argument per :func:`unet.options.option` field of the dataclass ``cls``.

    Args:
        parser: the command's parser; each field goes into the argument group its option names (made once).
        cls: an options dataclass (TilingOptions, InstanceOptions, DeviceOptions, RunConfig, ...).
        skip: field names this command does not take.
        only: if given, just these fields.
        inherit: every default becomes None, meaning "as ``inherit`` says" (e.g. ``"the checkpoint"``), and
            the help says so; the caller fills the Nones in.
    """
    for f, spec in option_fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        default = None if inherit else field_default(f)
        # argparse formats help with %: a literal % in an option's help is escaped here, not in the library.
        kwargs: dict = {"dest": spec.dest, "default": default, "help": spec.help.replace("%", "%%")}
        if inherit:
            kwargs["help"] += f" (default: from {inherit})"
        if spec.switch == "both":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.switch == "append":
            kwargs.update(action="append", metavar=spec.metavar)
        elif spec.switch is not None:
            kwargs["action"] = "store_true" if spec.switch == "on" else "store_false"
            if inherit:
                kwargs["action"] = "store_const"
                kwargs["const"] = spec.switch == "on"
        else:
            kwargs.update({k: v for k, v in (("choices", spec.choices), ("nargs", spec.nargs),
                                              ("metavar", spec.metavar)) if v is not None})
            if spec.parse is not None:
                kwargs["type"] = _argparse_type(spec.parse)
            if spec.required:
                kwargs["required"] = True
        _group(parser, spec.group).add_argument(*spec.flags, **kwargs)


def _argparse_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """``parse`` with its ValueError message kept (argparse would print a generic 'invalid value')."""
    if parse in (int, float, str):
        return parse

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def _group(parser: argparse.ArgumentParser, title: str | None):
    """The parser's argument group called ``title`` (made on first use); the parser itself for None."""
    if title is None:
        return parser
    for g in parser._action_groups:  # argparse keeps no public index of its groups
        if g.title == title:
            return g
    return parser.add_argument_group(title)


def options_from(args: argparse.Namespace, cls, **values):
    """The ``cls`` dataclass of parsed :func:`add_options` arguments; ``values`` fill or override fields.

    A field that ``add_options`` skipped keeps its default unless ``values`` gives it.
    """
    for f, spec in option_fields(cls):
        if f.name not in values and hasattr(args, spec.dest):
            values[f.name] = getattr(args, spec.dest)
    return cls(**values)


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
