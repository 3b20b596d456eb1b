"""Overlay pictures: a slice with its predicted membranes drawn in semi-transparent red (``infer.py --overlay``,
the bioimage.io package's cover)."""
from __future__ import annotations

import numpy as np

OVERLAY_RGB = np.array([255, 0, 0], dtype=np.float32)  # membranes drawn in red
OVERLAY_ALPHA = 0.5


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB picture of a slice with its predicted membranes (mask == 0) in semi-transparent red.

    Args:
        image: ``(C, H, W)`` float in [0, 1]; 3 channels are shown as RGB, otherwise channel 0 as grey.
        mask: ``(H, W)`` uint8, 0 = membrane.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    if image.shape[0] == 3:
        rgb = np.moveaxis(image, 0, -1).astype(np.float32)
    else:
        grey = image[0].astype(np.float32)
        # Contrast stretch for display only: 16-bit EM often fills a small part of its range.
        lo, hi = np.percentile(grey, (0.5, 99.5))
        grey = np.clip((grey - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(grey)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb = rgb * 255
    membrane = mask == 0
    rgb[membrane] = (1 - OVERLAY_ALPHA) * rgb[membrane] + OVERLAY_ALPHA * OVERLAY_RGB
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
