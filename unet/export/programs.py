"""Deployable exports of a trained UNet: a torch.export program (``.pt2``) or ONNX (``.onnx``).

Both take ``(N, in_channels, T, T)`` images scaled to [0, 1] (the model's own normalisation is inside the
graph) and return ``(N, num_classes, t, t)`` logits. The batch dimension N is dynamic; the spatial size T
is fixed at a valid tile size (``export.py --example-size``, default 572 for 'valid' and 512 for 'same' padding), so a
deployment tiles slices exactly as :mod:`unet.prediction.tiling` does. The model config, tile and output size travel
with a ``.pt2`` file as ``extra_files["unet.json"]`` (read them with ``torch.export.load(path,
extra_files={"unet.json": ""})``). Files are written atomically (temporary file, then rename).
"""
from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from unet.atomic import atomic_path, atomic_write
from unet.errors import UserError
from unet.options import option, positive_int
from unet.prediction.tiling import check_tile_budget, check_tile_size

EXPORT_SUFFIXES = (".pt2", ".onnx")
METADATA_NAME = "unet.json"
# torch.export specialises a dimension whose example size is 0 or 1, so trace with 2 and allow 1..MAX.
EXAMPLE_BATCH = 2
MAX_BATCH = 1024


@dataclass(frozen=True)
class ProgramOptions:
    """How a ``.pt2``/``.onnx`` program is traced (``export.py --format pt2|onnx``).

    Attributes:
        example_size: the program's static input height and width; None = :func:`default_tile_size`.
    """

    example_size: int | None = option(None, "static input height and width of a pt2/onnx program, a valid tile "
                                            "size of the model (default: 572 for 'valid', 512 for 'same' padding, or "
                                            "the next valid size); not used by bioimageio packages",
                                      flags="--example-size", parse=positive_int, metavar="PIXELS")


def default_tile_size(model: torch.nn.Module) -> int:
    """Export tile size: the smallest valid size >= 572 ('valid' padding) or >= 512 ('same')."""
    return model.valid_input_size(572 if model.padding == "valid" else 512)


def export_metadata(model: torch.nn.Module, tile_size: int) -> dict:
    """What a deployment needs besides the graph: config, input/output geometry, class meanings."""
    return {"format": "unet-em-export", "model_config": model.config.to_dict(),
            "input_shape": ["N", model.config.in_channels, tile_size, tile_size],
            "output_shape": ["N", model.config.num_classes, model.output_size(tile_size),
                             model.output_size(tile_size)],
            "input_range": "[0, 1] (uint8 / 255, uint16 / 65535); normalisation is inside the model",
            "labels": "argmax class 1 = cell interior (mask 255), class 0 = membrane"}


def export_program(model: torch.nn.Module, tile_size: int | None = None) -> torch.export.ExportedProgram:
    """torch.export the model in eval mode on CPU with a dynamic batch dimension.

    Args:
        model: a UNet (any device; it is copied to CPU float32 for export).
        tile_size: static input height and width (default: :func:`default_tile_size`).

    Returns:
        The ExportedProgram.
    """
    return _trace(*_prepare(model, tile_size))


def _prepare(model: torch.nn.Module, tile_size: int | None) -> tuple[torch.nn.Module, int]:
    """A CPU float32 eval-mode copy of ``model`` and a checked tile size (the default when None)."""
    # A copy, so that exporting never moves or switches the caller's model.
    model = copy.deepcopy(model).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
    if tile_size is None:
        return model, default_tile_size(model)
    check_tile_budget(model, tile_size, flag="--example-size")  # a huge one would die in the allocator
    return model, check_tile_size(model, tile_size)


def _trace(model: torch.nn.Module, tile_size: int, *, onnx: bool = False):
    """Capture a :func:`_prepare`-d model with a dynamic batch: an ExportedProgram, or an ONNXProgram."""
    example = (torch.rand(EXAMPLE_BATCH, model.config.in_channels, tile_size, tile_size),)
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}
    if onnx:
        # dynamo=True (the torch.export-based exporter, torch >= 2.5) shares the .pt2 graph capture.
        return torch.onnx.export(model, example, dynamo=True, dynamic_shapes=dynamic, input_names=["image"],
                                 output_names=["logits"])
    # strict=False: the non-strict tracer is the default from torch 2.7 on; 2.6 needs it said explicitly.
    return torch.export.export(model, example, dynamic_shapes=dynamic, strict=False)


def onnx_available() -> bool:
    """Whether the ONNX exporter's dependencies (onnx, onnxscript) can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def export_model(model: torch.nn.Module, path: str | Path, *, tile_size: int | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``model`` as a ``.pt2`` torch.export program or an ``.onnx`` file, atomically.

    Args:
        model: a UNet.
        path: destination; the suffix picks the format.
        tile_size: static spatial input size (default: :func:`default_tile_size`).
        overwrite: replace an existing file.

    Returns:
        The written path.

    Raises:
        UserError: unknown suffix, existing file, missing folder, invalid tile size, ONNX requested
            without its packages, or an ONNX model over protobuf's 2 GiB limit.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise UserError(f"{path}: --output must end in .pt2 (torch.export) or .onnx (ONNX)")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: file exists; pass --overwrite to replace it or choose another name")
    if not path.parent.is_dir():
        raise UserError(f"{path}: folder {path.parent} does not exist; create it first")
    if suffix == ".onnx" and not onnx_available():
        raise UserError(f"{path}: ONNX export needs the onnx and onnxscript packages; "
                        f"pip install -e .[onnx] (or export to .pt2)")
    model, tile_size = _prepare(model, tile_size)
    if suffix == ".pt2":
        program = _trace(model, tile_size)
        extra = {METADATA_NAME: json.dumps(export_metadata(model, tile_size))}
        # Through a file object: a failed write then surfaces as an OSError (one line), not a C++ abort.
        atomic_write(path, lambda f: torch.export.save(program, f, extra_files=extra))
        return path
    with _onnx_size_limit(path):
        program = _trace(model, tile_size, onnx=True)
        with atomic_path(path) as tmp:  # the ONNX saver wants a path name: a named temporary beside the target
            program.save(str(tmp))
    return path


@contextlib.contextmanager
def _onnx_size_limit(path: Path) -> Iterator[None]:
    """protobuf's 2 GiB ceiling on one ONNX message, hit while serialising, as one line naming ``path``.

    protobuf raises ``ValueError: Message onnx.ModelProto exceeds maximum protobuf size of 2GB: <bytes>``
    (torch's TorchScript-based exporter a RuntimeError saying the same), from deep inside the exporter.
    """
    try:
        yield
    except (ValueError, RuntimeError) as e:
        text = str(e)
        if "2GB" not in text and "2GiB" not in text and "protobuf" not in text:
            raise
        raise UserError(f"{path}: the model does not fit one ONNX file (protobuf's 2 GiB limit); export it with "
                        f"--format pt2, or train a model with fewer parameters") from None


def load_export_metadata(path: str | Path) -> dict:
    """The ``unet.json`` metadata stored in a ``.pt2`` export."""
    extra = {METADATA_NAME: ""}
    torch.export.load(str(path), extra_files=extra)
    return json.loads(extra[METADATA_NAME])
