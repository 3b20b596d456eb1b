"""``python export.py``: the one way to export a checkpoint: a BioImage Model Zoo package
(:mod:`unet.export.bioimageio`), a torch.export program or an ONNX file (:mod:`unet.export.programs`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from unet.checkpoint import load_model
from unet.cli.common import CheckpointArgs, HelpFormatter, add_options, options_from
from unet.errors import UserError
from unet.export.bioimageio import PackageOptions, build_package
from unet.export.bioimageio_network import WEIGHT_FORMATS
from unet.export.programs import ProgramOptions, export_model

FORMATS = ("bioimageio", "pt2", "onnx")
PACKAGE_ONLY = ("author", "maintainer", "license", "name", "description", "git_repo", "sample", "no_test")


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
    parser.add_argument("--output", required=True, help="the file to write: .zip (bioimageio), .pt2 or .onnx")
    parser.add_argument("--format", default="bioimageio",
                        help="bioimageio (a model package), pt2 (torch.export program with a dynamic batch "
                             "dimension) or onnx")
    add_options(parser, ProgramOptions)
    parser.add_argument("--author", action="append", default=[], metavar="NAME[;AFFILIATION[;GITHUB_USER]]",
                        help="an author of the model (repeat for several); required")
    parser.add_argument("--maintainer", action="append", default=[], metavar="GITHUB_USER[;NAME]",
                        help="a maintainer (repeat for several)")
    parser.add_argument("--license", default=None, help="SPDX licence of the weights (e.g. MIT, CC-BY-4.0); required")
    parser.add_argument("--name", default=None, help="package name (default: made from the model)")
    parser.add_argument("--description", default=None, help="one-paragraph description (default: made from "
                                                            "the checkpoint's model and training data)")
    parser.add_argument("--git-repo", default=None, help="URL of the code that trained the model")
    parser.add_argument("--weight-formats", default=",".join(WEIGHT_FORMATS),
                        help="comma-separated subset of " + ", ".join(WEIGHT_FORMATS))
    parser.add_argument("--sample", default=None,
                        help="TIFF/PNG image or stack whose first slice makes the test tensors and the cover; "
                             "None = the built-in synthetic stack")
    parser.add_argument("--no-test", action="store_true",
                        help="skip bioimageio.core's test of every weight format before the package is written")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing package")
    return parser


def main(args: argparse.Namespace) -> Path:
    """Run ``export.py``: check everything, then write the package or program atomically.

    Returns:
        The written file's path.

    Raises:
        UserError: an unknown format, not exactly one checkpoint, flags of the other format, or any bad input.
    """
    if args.format not in FORMATS:
        raise UserError(f"--format: unknown package format {args.format!r}; choose bioimageio (a model package), "
                        f"pt2 or onnx (programs)")
    ckpts = options_from(args, CheckpointArgs).ckpt
    if len(ckpts) != 1:
        raise UserError("--ckpt: export.py takes one checkpoint; export the members of an ensemble one by one")
    program = options_from(args, ProgramOptions)
    if args.format == "bioimageio":
        if program.example_size is not None:
            raise UserError("--example-size is for --format pt2|onnx; a bioimage.io package takes every block size")
        return _package(args, ckpts[0])
    given = [f"--{name.replace('_', '-')}" for name in PACKAGE_ONLY if getattr(args, name)]
    if given:
        raise UserError(f"{', '.join(given)}: only for --format bioimageio, not {args.format}")
    if Path(args.output).suffix.lower() != f".{args.format}":
        raise UserError(f"{args.output}: --format {args.format} writes a .{args.format} file; end --output in "
                        f".{args.format}")
    model, _ = load_model(ckpts[0])
    path = export_model(model, args.output, tile_size=program.example_size, overwrite=args.overwrite)
    print(f"exported {path} ({path.stat().st_size / 2 ** 20:.1f} MiB)")
    return path


def _package(args: argparse.Namespace, ckpt: str) -> Path:
    """The bioimage.io package of ``export.py --format bioimageio``."""
    options = PackageOptions(
        authors=list(args.author), license=args.license, maintainers=list(args.maintainer), name=args.name,
        description=args.description, git_repo=args.git_repo, sample=args.sample, overwrite=args.overwrite,
        weight_formats=tuple(f.strip() for f in args.weight_formats.split(",") if f.strip()),
        test=not args.no_test)
    path = build_package(ckpt, args.output, options)
    tested = "validated" if args.no_test else "validated and tested (bioimageio.core test_model)"
    print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB; {', '.join(options.weight_formats)}; {tested})")
    return path
