"""Whole-slice prediction: a model and one slice in, class probabilities out (the one predictor).

Training's validation, ``evaluate.py`` and ``infer.py`` all predict through :func:`predict_probabilities`,
as MONAI keeps ``sliding_window_inference`` apart from its evaluators. The tiling itself (plans, mirror
padding, blending, TTA) is :mod:`unet.tiling`; this module adds the model: eval mode, ``inference_mode``,
autocast, memory layout and softmax.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from unet import tiling
from unet.device import DeviceSetup
from unet.errors import UserError
from unet.tiling import TilingOptions


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
        options: whole-slice tiling options (None: the defaults of :class:`~unet.tiling.TilingOptions`).

    Returns:
        ``(num_classes, H, W)`` float32 probabilities on ``dev.device``.
    """
    opts = options or TilingOptions()
    x = torch.as_tensor(image)
    if x.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(x.shape)}")
    in_channels = model.config.in_channels
    if x.shape[0] != in_channels:
        raise UserError(f"the model expects {in_channels}-channel images but got {x.shape[0]} channels; "
                        f"use data with {in_channels} channel(s) or a checkpoint trained on such data")
    x = x.to(dev.device, dtype=torch.float32)
    layout = dev.memory_format

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        # Tiles arrive as NCHW slices of the padded slice; the model's fast layout is dev.memory_format.
        with dev.autocast():
            logits = model(batch.contiguous(memory_format=layout))
        return logits.float().softmax(1)

    was_training = model.training
    model.eval()  # NVIDIA's Ascend port predicts with dropout on; never do that here
    try:
        with torch.inference_mode():
            probs = tiling.predict_slice(predictor, x, geometry=model, tile_size=opts.tile_size,
                                         tile_batch=opts.tile_batch, overlap=opts.overlap, blend=opts.blend,
                                         tta=opts.tta, memory_budget_mb=opts.memory_budget_mb,
                                         num_outputs=model.config.num_classes)
    finally:
        model.train(was_training)
    return probs.float()


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
    plan = tiling.slice_plan(height, width, model, tile_size=opts.tile_size, overlap=opts.overlap,
                             memory_budget_mb=opts.memory_budget_mb)
    return {"tile_size": plan.tile_size, "output_size": plan.output_size, "tiles_y": plan.tiles_y,
            "tiles_x": plan.tiles_x, "num_tiles": plan.num_tiles, "description": str(plan)}
