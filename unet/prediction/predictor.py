"""Whole-slice prediction: a model and one slice in, class probabilities out (the one predictor).

Training's validation, ``evaluate.py`` and ``infer.py`` all predict through :func:`predict_probabilities`,
as MONAI keeps ``sliding_window_inference`` apart from its evaluators. The tiling itself (plans, mirror
padding, blending, TTA) is :mod:`unet.prediction.tiling` and :mod:`unet.prediction.tiles`; this module adds the model: eval mode, ``inference_mode``,
autocast, memory layout and softmax.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np
import torch

from unet.device import DeviceSetup
from unet.errors import UserError
from unet.prediction.tiles import predict_slice
from unet.prediction.tiling import TilingOptions, slice_plan


# Share of the free device memory (host RAM on CPU) that whole-slice prediction lets its activations take;
# the rest stays for the allocator's caching, cuDNN workspaces, the stitched slices and other processes.
FREE_MEMORY_SHARE = 0.5


def predict_probabilities(model: torch.nn.Module, image: np.ndarray | torch.Tensor, dev: DeviceSetup,
                          options: TilingOptions | None = None) -> torch.Tensor:
    """Class probabilities of one whole slice at native resolution.

    The model runs in eval mode (dropout off, BatchNorm on running statistics) under ``inference_mode``
    and the device's autocast; its previous train/eval mode is restored afterwards, so the training loop
    can call this mid-run.

    Args:
        model: a UNet (unwrapped from DDP / torch.compile) already on ``dev.device``.
        image: ``(C, H, W)`` float array or tensor scaled to [0, 1], any size.
        dev: the device setup (autocast, memory layout).
        options: whole-slice tiling options (None: the defaults of :class:`~unet.prediction.tiling.TilingOptions`).

    Returns:
        ``(num_classes, H, W)`` float32 probabilities on ``dev.device``.
    """
    opts = options or TilingOptions()
    x = torch.as_tensor(image)
    if x.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(x.shape)}")
    check_channels(model, x)
    x = x.to(dev.device, dtype=torch.float32)
    with eval_mode(model), torch.inference_mode():
        probs = predict_slice(tile_predictor(model, dev), x, opts, geometry=model,
                              num_outputs=model.config.num_classes)
    return probs.float()


def mask_from_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """What infer.py writes as ``--output`` for ``(K, H, W)`` probabilities: a ``(H, W)`` uint8 picture.

    Two classes: the binary label convention, 255 = cell interior (class 1), 0 = membrane. Computed as
    ``probs[1] > probs[0]`` (2 passes instead of argmax's 4), which is ``argmax(0) == 1`` at ties too (argmax
    takes the first, class 0) and at NaN (softmax makes both classes NaN together, where argmax gives class 0
    and ``>`` False). K > 2 classes: the class map, ``argmax(0)`` = 0..K-1 (K <= 255, as the labels allow).
    """
    if probs.shape[0] == 2:
        return (probs[1] > probs[0]).view(torch.uint8) * 255
    return probs.argmax(0).to(torch.uint8)


def written_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """What infer.py writes as ``--probabilities``: the cell probability ``(H, W)`` of a two-class model (class 0
    is one minus it), every class ``(K, H, W)`` of a K-class one."""
    return probs[1] if probs.shape[0] == 2 else probs


def probability_shape(shape: tuple[int, int, int], num_classes: int) -> tuple[int, ...]:
    """The ``--probabilities`` volume of a ``(Z, H, W)`` stack: ``(Z, H, W)`` for two classes, else
    ``(Z, K, H, W)`` (a channel per class; chunked writers store it as OME-NGFF's ``czyx``)."""
    return tuple(shape) if num_classes == 2 else (shape[0], num_classes, *shape[1:])


def check_channels(model: torch.nn.Module, image: torch.Tensor) -> None:
    """Raise a one-line UserError when a ``(C, H, W)`` image has not the model's channel count."""
    in_channels = model.config.in_channels
    if image.shape[0] != in_channels:
        raise UserError(f"the model expects {in_channels}-channel images but got {image.shape[0]} channels; "
                        f"use data with {in_channels} channel(s) or a checkpoint trained on such data")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside, the model's previous train/eval mode restored after."""
    was_training = model.training
    model.eval()  # NVIDIA's Ascend port predicts with dropout on; never do that here
    try:
        yield
    finally:
        model.train(was_training)


def tile_predictor(model: torch.nn.Module, dev: DeviceSetup,
                   forward: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """What every tile batch goes through: the device's layout and autocast, the model, softmax in float32.

    Args:
        model: the network (called unless ``forward`` is given).
        dev: the device setup.
        forward: e.g. ``torch.compile(model)``, called instead of ``model``.
    """
    run = model if forward is None else forward
    layout = dev.memory_format

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        # Tiles arrive as NCHW slices of the padded slice; the model's fast layout is dev.memory_format.
        with dev.autocast():
            logits = run(batch.contiguous(memory_format=layout))
        return logits.float().softmax(1)

    return predictor


def free_memory_budget_mb(dev: DeviceSetup, share: float = FREE_MEMORY_SHARE) -> float:
    """A tiling memory budget from the device's free memory now and the autocast dtype.

    :func:`unet.prediction.tiling.estimate_bytes_per_pixel` counts float32 activations; under 16-bit autocast the
    convolutions' activations take half of that, so the same free memory holds twice the estimated pixels.
    The budget is therefore ``share * free * 4 / activation bytes``, in the tiler's (float32) megabytes.

    Args:
        dev: the device (free memory: ``mem_get_info`` on an accelerator, MemAvailable on CPU).
        share: fraction of the free memory to give to activations.

    Returns:
        megabytes for :attr:`TilingOptions.memory_budget_mb`.
    """
    activation_bytes = torch.finfo(dev.amp_dtype).bits // 8 if dev.amp else 4
    return share * dev.free_memory_bytes() * 4 / activation_bytes / 2 ** 20


def tiling_plan(model: torch.nn.Module, height: int, width: int,
                options: TilingOptions | None = None) -> dict[str, Any]:
    """The tile plan :func:`predict_probabilities` uses for one slice size, as a JSON-able dict.

    Args:
        model: the UNet (its size arithmetic decides the tiles).
        height, width: slice size.
        options: as for :func:`predict_probabilities` (its tile size, overlap and memory budget count).

    Returns:
        ``tile_size``, ``output_size``, ``tiles_y``, ``tiles_x``, ``num_tiles`` and a ``description``.
    """
    opts = options or TilingOptions()
    plan = slice_plan(height, width, model, opts)
    return {"tile_size": plan.tile_size, "output_size": plan.output_size, "tiles_y": plan.tiles_y,
            "tiles_x": plan.tiles_x, "num_tiles": plan.num_tiles, "description": str(plan)}
