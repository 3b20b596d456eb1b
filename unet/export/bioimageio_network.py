"""The network a BioImage Model Zoo package holds, and the files made from it: weights in each format, test
tensors and the cover picture, all from one sample slice (see :mod:`unet.export.bioimageio` for the package).

Tiling. A bioimage.io tool cuts a slice into blocks of ``min + n * step`` pixels (ParameterizedSize) that
overlap by a halo, pads the slice edges (here: ``reflect``, which is :func:`unet.prediction.tiles.mirror_pad`)
and crops the halo from every block's output. A 'valid' UNet crops its margin (92 px for the reference depth-5
model) itself; :class:`BioimageioUNet` pads its output back to the block size so that the spec's "output size =
input size, crop ``halo``" holds, and the halo is chosen (:func:`package_geometry`) so that every block sits on
the pooling grid of infer.py's canvas and drops the transposed-convolution edge band
(:attr:`unet.model.UNet.edge_band`): a tiled bioimage.io prediction then equals the one-pass prediction of
:mod:`unet.prediction.tiling` pixel for pixel up to float rounding.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from unet import model as unet_model
from unet.data.synthetic import make_synthetic_em
from unet.device import setup_device
from unet.errors import UserError
from unet.io.images import as_image, iter_pages, scale_by_dtype, stack_info
from unet.model import ModelConfig, UNet
from unet.prediction.overlay import overlay
from unet.prediction.predictor import mask_from_probabilities, predict_probabilities

WEIGHT_FORMATS = ("pytorch_state_dict", "torchscript", "onnx")
ONNX_OPSET = 17
SAMPLE_SIZE = 256  # test tensors: at most this many pixels a side, cut from the sample slice


# ------------------------------------------------------------------------------------------ geometry

@dataclass(frozen=True)
class PackageGeometry:
    """How the packaged network is tiled (all sizes in pixels, the same along y and x).

    Attributes:
        margin: context the UNet crops from each side (92 for the reference 'valid' model, 0 for 'same').
        step: spacing of valid input sizes, the pooling alignment ``2 ** (depth - 1)``.
        crop: rows/columns the package network drops at the bottom/right of its input so that a block size
            that keeps tiles on the pooling grid is a valid UNet input.
        halo: what a tool crops from each side of a block's output (and pads around the slice).
        min_size: smallest block (input tensor) size; valid sizes are ``min_size + n * step``.
    """

    margin: int
    step: int
    crop: int
    halo: int
    min_size: int

    def block_size(self, inner: int) -> int:
        """Input block size whose output, halo cropped, covers ``inner`` pixels (a multiple of ``step``)."""
        return inner + 2 * self.halo


def package_geometry(model: UNet) -> PackageGeometry:
    """Valid sizes and halo of a UNet's package, from :mod:`unet.model`'s size arithmetic.

    'valid' padding: the smallest input ``v`` gives ``v - 2 * margin`` output pixels; sizes go up in steps of
    ``g = 2 ** (depth - 1)``. Blocks must start on multiples of ``g`` of infer.py's canvas (origin ``-margin``),
    so ``halo = margin (mod g)`` and the inner size is a multiple of ``g``; the network drops ``crop``
    bottom/right input pixels to make such a block a valid input, and the halo also covers those and the
    ``g - 1`` edge-band pixels. Reference model: margin 92, step 16, crop 12, halo 124, sizes 264 + 16 n.
    'same' padding: sizes are multiples of ``g``; halo ``g`` keeps the edge band out of every block.
    """
    g = 2 ** (model.config.depth - 1)
    if model.padding == "same":
        return PackageGeometry(margin=0, step=g, crop=0, halo=g, min_size=3 * g)
    smallest = model.valid_input_size(1)
    margin = (smallest - model.output_size(smallest)) // 2
    crop = -model.output_size(smallest) % g
    halo = margin + g * math.ceil((crop + model.edge_band) / g)
    min_size = smallest + crop
    while min_size < 2 * halo + g:
        min_size += g
    return PackageGeometry(margin=margin, step=g, crop=crop, halo=halo, min_size=min_size)


class BioimageioUNet(nn.Module):
    """The packaged network: class probabilities at the input's size, the halo region set to 0.

    Args:
        config: a :class:`~unet.model.ModelConfig` as a dict.
        margin: context the UNet crops from each side ('valid'), 0 for 'same'.
        crop: input rows/columns dropped at the bottom/right (see :func:`package_geometry`).
    """

    def __init__(self, config: dict, margin: int = 0, crop: int = 0):
        super().__init__()
        self.unet = UNet(ModelConfig.from_dict(config))
        self.margin, self.crop = int(margin), int(crop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, B, B)`` images in [0, 1] -> ``(N, classes, B, B)`` probabilities (softmax over classes)."""
        if self.crop:
            x = x[..., :-self.crop, :-self.crop]
        probs = self.unet(x).softmax(1)
        m, c = self.margin, self.crop
        if m or c:
            # Output pixel i of a 'valid' UNet is input pixel i + margin: pad it back into place.
            probs = torch.nn.functional.pad(probs, (m, m + c, m, m + c))
        return probs


def package_network(model: UNet) -> BioimageioUNet:
    """A CPU float32 eval-mode :class:`BioimageioUNet` holding ``model``'s weights."""
    geom = package_geometry(model)
    net = BioimageioUNet(model.config.to_dict(), geom.margin, geom.crop)
    net.unet.load_state_dict(model.state_dict())
    return net.to("cpu", torch.float32).eval()


def architecture_source() -> str:
    """A standalone Python file defining :class:`BioimageioUNet`: unet/model.py followed by the class."""
    return inspect.getsource(unet_model) + "\n\n" + inspect.getsource(BioimageioUNet)


def make_test_tensors(net: BioimageioUNet, crop: np.ndarray, halo: int) -> tuple[np.ndarray, np.ndarray]:
    """Test input and output: ``crop`` mirror-padded by ``halo`` as a tool pads a slice, and the raw output.

    bioimageio.core reproduces test outputs by running the network on the test input as it is (no halo
    padding, no cropping), so both tensors are block-sized, the output's halo included.

    Args:
        net: the packaged network.
        crop: ``(C, S, S)`` raw pixels (uint8, uint16 or float32), S a multiple of the geometry's step.
        halo: the package's halo.

    Returns:
        ``(1, C, B, B)`` input in ``crop``'s dtype and ``(1, classes, B, B)`` float32 probabilities,
        ``B = S + 2 * halo``.
    """
    padded = np.pad(crop, ((0, 0), (halo, halo), (halo, halo)), mode="reflect")[None]
    with torch.inference_mode():
        out = net(torch.from_numpy(scale_by_dtype(padded)))
    return padded, out.numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------ sample

@dataclass
class Sample:
    """The slice the test tensors and cover are made from.

    Attributes:
        raw: ``(C, H, W)`` pixels as stored (uint8, uint16 or float32).
        source: where it came from, for the README.
    """

    raw: np.ndarray
    source: str

    @property
    def dtype(self) -> str:
        return "float32" if np.issubdtype(self.raw.dtype, np.floating) else str(self.raw.dtype)


def load_sample(path: str | None, in_channels: int) -> Sample:
    """First slice of ``path`` (any stack infer.py reads), or of the built-in synthetic stack."""
    if path is None:
        images, _ = make_synthetic_em(1, SAMPLE_SIZE, SAMPLE_SIZE, seed=0)
        raw, source = images[0][None], "slice 0 of the built-in synthetic EM stack"
    else:
        stack_info(path)  # one-line errors for a missing, unreadable or unsupported file
        raw = next(iter(iter_pages(path, 1)))[0]
        raw = raw[None] if raw.ndim == 2 else raw
        source = f"slice 0 of {Path(path).name}"
    as_image(raw, path or "synthetic", in_channels)  # channel count and dtype checks
    if raw.dtype not in (np.uint8, np.uint16) and not np.issubdtype(raw.dtype, np.floating):
        raise UserError(f"{path}: pixel type {raw.dtype} is not supported; use uint8, uint16 or float")
    return Sample(raw if raw.dtype in (np.uint8, np.uint16) else raw.astype(np.float32), source)


def sample_crop(sample: Sample, step: int) -> np.ndarray:
    """The centre ``S x S`` of the sample, S the largest multiple of ``step`` up to :data:`SAMPLE_SIZE`."""
    h, w = sample.raw.shape[-2:]
    size = min(SAMPLE_SIZE, h, w) // step * step
    if size < step:
        raise UserError(f"{sample.source}: the slice ({w}x{h}) is smaller than the model's {step}-pixel "
                        f"alignment; pass --sample with a larger image")
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(sample.raw[:, top:top + size, left:left + size])


# ------------------------------------------------------------------------------------------ files

def write_weights(net: BioimageioUNet, formats: tuple[str, ...], folder: Path, example_size: int) -> dict[str, Path]:
    """Write each requested weight format into ``folder``; returns format (and "architecture") -> file.

    TorchScript is ``torch.jit.trace`` and ONNX the TorchScript-based exporter (``dynamo=False``) with
    dynamic batch, height and width: the torch.export-based exporter specialises the spatial sizes because
    ``UNet.forward`` checks them with ``int()``, and a package must accept every size ``min + n * step``.
    """
    files: dict[str, Path] = {}
    example = torch.rand(1, net.unet.config.in_channels, example_size, example_size)
    if "pytorch_state_dict" in formats:
        files["pytorch_state_dict"] = folder / "weights.pt"
        torch.save(net.state_dict(), files["pytorch_state_dict"])
        files["architecture"] = folder / "unet_em_model.py"
        files["architecture"].write_text(architecture_source(), encoding="utf-8")
    with warnings.catch_warnings():
        # The size check in UNet.forward is a Python int under tracing (TracerWarning); the traced graph
        # keeps the size arithmetic of center_crop and slicing symbolic (tested at other sizes).
        warnings.simplefilter("ignore")
        if "torchscript" in formats:
            files["torchscript"] = folder / "weights_torchscript.pt"
            torch.jit.trace(net, example).save(str(files["torchscript"]))
        if "onnx" in formats:
            files["onnx"] = folder / "weights.onnx"
            dims = {0: "batch", 2: "y", 3: "x"}
            torch.onnx.export(net, (example,), str(files["onnx"]), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["raw"], output_names=["probabilities"],
                              dynamic_axes={"raw": dims, "probabilities": dims})
    return files


def write_cover(net: BioimageioUNet, sample: Sample, path: Path) -> None:
    """Cover picture: the sample slice beside infer.py's ``--overlay`` of it (predicted membranes in red; a K-class
    model's classes in their colours)."""
    image = scale_by_dtype(sample.raw)
    probs = predict_probabilities(net.unet, image, setup_device("cpu"))
    mask = mask_from_probabilities(probs).numpy()
    picture = overlay(image, mask, net.unet.config.num_classes)
    plain = overlay(image, np.full_like(mask, 255))  # the same contrast stretch, nothing drawn
    Image.fromarray(np.concatenate([plain, picture], axis=1), mode="RGB").save(path, format="PNG")
