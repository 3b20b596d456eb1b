"""One definition per option: a dataclass field carries its flag, help, parse type and group as metadata.

A setting is written once, as a field of the typed options object the library takes (``TilingOptions``,
``InstanceOptions``, ``DeviceOptions``, ``RunConfig``, ...): its default is the field's default, and
:func:`option` attaches what the command line needs. The command wing (:mod:`unet.cli.common`) builds
argparse arguments from those fields and turns parsed arguments back into the dataclass; nothing below it
imports argparse. The resume identity of a training run is the set of fields marked ``identity=True``.

A leaf module: it imports nothing from the package.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

_KEY = "unet.option"


@dataclass(frozen=True)
class Option:
    """The command-line side of one setting (built by :func:`option`).

    Attributes:
        help: the flag's help text (the default is appended by the help formatter).
        flags: option strings, the first the main spelling (e.g. ``("--batch-size", "--batch_size")``).
        dest: attribute name on the parsed arguments (default: the first flag, dashes as underscores).
        parse: turns the text into the value; raises ValueError with a message for a bad value.
        choices: the allowed values, or None.
        switch: for bools: ``"on"`` (``--x`` sets True), ``"off"`` (``--no-x`` sets False), ``"both"``
            (``--x`` / ``--no-x``); for lists: ``"append"`` (each ``--x V`` adds V); None for other types.
        nargs, metavar, required: as argparse's.
        group: the help section the flag is listed under.
        identity: part of a training run's identity (a resume with another value is refused).
    """

    help: str
    flags: tuple[str, ...]
    dest: str
    parse: Callable[[str], Any] | None = None
    choices: tuple | None = None
    switch: str | None = None
    nargs: str | None = None
    metavar: str | None = None
    required: bool = False
    group: str | None = None
    identity: bool = False


def option(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] | str | None = None,
           name: str | None = None, dest: str | None = None, parse: Callable[[str], Any] | None = None,
           choices=None, switch: str | None = None, nargs: str | None = None, metavar: str | None = None,
           required: bool = False, group: str | None = None, identity: bool = False,
           default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its command-line definition.

    Args:
        default: the setting's default (also the flag's).
        help: help text.
        flags: option strings; default ``--<name>`` with underscores as dashes.
        name: the field's name, needed only to derive ``flags`` when they are not given.
        dest: parsed-argument attribute (default: from the first flag).
        parse: text -> value (``int``, ``float``, :func:`positive_int`, ...); None for strings and bools.
        choices, switch, nargs, metavar, required, group, identity: see :class:`Option`.
        default_factory: instead of ``default``, for mutable defaults.
    """
    if flags is None:
        if name is None:
            raise ValueError("option() needs flags= or name=")
        flags = ("--" + name.replace("_", "-"),)
    flags = (flags,) if isinstance(flags, str) else tuple(flags)
    if switch not in (None, "on", "off", "both", "append"):
        raise ValueError(f"switch must be on, off, both or append, got {switch!r}")
    spec = Option(help=help, flags=flags, dest=dest or _dest(flags[0], switch), parse=parse,
                  choices=tuple(choices) if choices is not None else None, switch=switch, nargs=nargs,
                  metavar=metavar, required=required, group=group, identity=identity)
    kwargs = {"default_factory": default_factory} if default_factory is not None else {"default": default}
    return dataclasses.field(metadata={_KEY: spec}, **kwargs)


def _dest(flag: str, switch: str | None) -> str:
    name = flag.lstrip("-")
    if switch == "off" and name.startswith("no-"):
        name = name[3:]  # --no-instance-fill sets instance_fill = False
    return name.replace("-", "_")


def option_fields(cls) -> Iterator[tuple[dataclasses.Field, Option]]:
    """The fields of a dataclass (type or instance) that carry an :class:`Option`, in order."""
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_KEY)
        if spec is not None:
            yield f, spec


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (calling its factory), or ``dataclasses.MISSING``."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def flag_of(cls, name: str) -> str | None:
    """The main flag of the field ``name`` of ``cls`` (None when the field has no option), for messages."""
    return next((spec.flags[0] for f, spec in option_fields(cls) if f.name == name), None)


def identity_fields(cls) -> tuple[str, ...]:
    """Names of the fields marked ``identity=True`` (a training run's identity), in order."""
    return tuple(f.name for f, spec in option_fields(cls) if spec.identity)


# ------------------------------------------------------------------------------ value parsers
# Each raises ValueError with the message the user sees after "argument --flag: ".

def positive_int(text: str) -> int:
    """A whole number >= 1."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """A whole number >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"must be a whole number, got {text!r}") from None
    if value < low:
        raise ValueError(f"must be at least {low}, got {value}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    return _bounded_float(text, lambda v: 0 <= v < 1, "in [0, 1)")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _bounded_float(text, lambda v: v > 0, "a number > 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _bounded_float(text, lambda v: v >= 0, "a number >= 0")


def _bounded_float(text: str, ok: Callable[[float], bool], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be {what}, got {text!r}") from None
    if not (ok(value) and math.isfinite(value)):  # NaN and inf fail too
        raise ValueError(f"must be {what}, got {value:g}")
    return value
