"""``python export.py``: the one way to export a checkpoint: a BioImage Model Zoo package
(:mod:`unet.export.bioimageio`), a torch.export program or an ONNX file (:mod:`unet.export.programs`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from unet.checkpoint import load_model
from unet.cli.common import CheckpointArgs, HelpFormatter, add_options, options_from
from unet.errors import UserError
from unet.export.bioimageio import PackageOptions, build_package
from unet.export.programs import ProgramOptions, export_model
from unet.options import field_default, option, option_fields

FORMATS = ("bioimageio", "pt2", "onnx")


@dataclass(frozen=True)
class ExportArgs:
    """export.py's own flags (the package's are :class:`PackageOptions`, the programs' :class:`ProgramOptions`)."""

    output: str = option(None, "the file to write: .zip (bioimageio), .pt2 or .onnx", flags="--output",
                         required=True)
    # A free string, not argparse choices, so that a wrong format gets the one-line message of main().
    format: str = option("bioimageio", "bioimageio (a model package), pt2 (torch.export program with a dynamic "
                                       "batch dimension) or onnx", flags="--format")
    overwrite: bool = option(False, "replace an existing file", flags="--overwrite", switch="on")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Arguments of ``python export.py``."""
    parser = argparse.ArgumentParser(
        prog="export.py", add_help=add_help, formatter_class=HelpFormatter,
        description="Export a train.py checkpoint: a BioImage Model Zoo model (bioimage.io spec 0.5 .zip) for\n"
                    "Fiji/deepImageJ, napari, ilastik and bioimageio.core, a torch.export program (.pt2) or ONNX.\n\n"
                    "  python export.py --ckpt best.pt --output unet.zip --author \"Jane Doe\" --license MIT\n"
                    "  python export.py --ckpt best.pt --format pt2 --output unet.pt2 [--example-size 572]\n"
                    "  python export.py --ckpt best.pt --format onnx --output unet.onnx\n\n"
                    "bioimageio needs the extra: pip install -e .[bioimageio]; onnx: pip install -e .[onnx]")
    add_options(parser, CheckpointArgs)
    add_options(parser, ExportArgs)
    add_options(parser, ProgramOptions)
    add_options(parser, PackageOptions)
    return parser


def main(args: argparse.Namespace) -> Path:
    """Run ``export.py``: check everything, then write the package or program atomically.

    Returns:
        The written file's path.

    Raises:
        UserError: an unknown format, not exactly one checkpoint, flags of the other format, or any bad input.
    """
    request = options_from(args, ExportArgs)
    if request.format not in FORMATS:
        raise UserError(f"--format: unknown package format {request.format!r}; choose bioimageio (a model package), "
                        f"pt2 or onnx (programs)")
    ckpts = options_from(args, CheckpointArgs).ckpt
    if len(ckpts) != 1:
        raise UserError("--ckpt: export.py takes one checkpoint; export the members of an ensemble one by one")
    program = options_from(args, ProgramOptions)
    if request.format == "bioimageio":
        if program.example_size is not None:
            raise UserError("--example-size is for --format pt2|onnx; a bioimage.io package takes every block size")
        return _package(args, request, ckpts[0])
    given = [spec.flags[0] for f, spec in option_fields(PackageOptions)
             if getattr(args, spec.dest) != field_default(f)]
    if given:
        raise UserError(f"{', '.join(given)}: only for --format bioimageio, not {request.format}")
    if Path(request.output).suffix.lower() != f".{request.format}":
        raise UserError(f"{request.output}: --format {request.format} writes a .{request.format} file; end --output in "
                        f".{request.format}")
    model, _ = load_model(ckpts[0])
    path = export_model(model, request.output, tile_size=program.example_size, overwrite=request.overwrite)
    print(f"exported {path} ({path.stat().st_size / 2 ** 20:.1f} MiB)")
    return path


def _package(args: argparse.Namespace, request: ExportArgs, ckpt: str) -> Path:
    """The bioimage.io package of ``export.py --format bioimageio``."""
    options = options_from(args, PackageOptions, overwrite=request.overwrite)
    path = build_package(ckpt, request.output, options)
    tested = "validated and tested (bioimageio.core test_model)" if options.test else "validated"
    print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB; {', '.join(options.weight_formats)}; {tested})")
    return path
