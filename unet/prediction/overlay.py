"""Overlay pictures: a slice with its prediction drawn in semi-transparent colour (``infer.py --overlay``, the
bioimage.io package's cover). Two-class models: the predicted membranes in red. K-class models: every class in
its own colour (:func:`class_colours`), as ilastik shows a segmentation."""
from __future__ import annotations

import colorsys

import numpy as np

OVERLAY_RGB = np.array([255, 0, 0], dtype=np.float32)  # membranes drawn in red
OVERLAY_ALPHA = 0.5
# The first classes' colours: red (class 0, as the two-class membranes), then green, blue, yellow, magenta, cyan,
# orange, purple; distinct on grey EM and from each other.
CLASS_RGB = ((255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 220, 0), (255, 0, 255), (0, 220, 220), (255, 128, 0),
             (140, 60, 255))
_GOLDEN = 0.618033988749895  # hue step past the table: every further class far from the one before


def class_colours(num_classes: int) -> np.ndarray:
    """``(K, 3)`` float32 RGB, one colour per class: :data:`CLASS_RGB`, then hues a golden-ratio step apart."""
    extra = [tuple(255 * c for c in colorsys.hsv_to_rgb((0.1 + k * _GOLDEN) % 1, 0.9, 1.0))
             for k in range(max(0, num_classes - len(CLASS_RGB)))]
    return np.array((list(CLASS_RGB) + extra)[:num_classes], dtype=np.float32)


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """RGB picture of a slice with its prediction drawn over it, ``OVERLAY_ALPHA`` opaque.

    Args:
        image: ``(C, H, W)`` float in [0, 1]; 3 channels are shown as RGB, otherwise channel 0 as grey.
        mask: ``(H, W)`` uint8 as infer.py writes it (:func:`unet.prediction.predictor.mask_from_probabilities`):
            for two classes 0 = membrane (drawn red), 255 = cell (not drawn); for K > 2 the class map 0..K-1,
            each class drawn in its :func:`class_colours` colour.
        num_classes: the model's K.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    rgb = _display_rgb(image) * 255
    if num_classes == 2:
        membrane = mask == 0
        rgb[membrane] = (1 - OVERLAY_ALPHA) * rgb[membrane] + OVERLAY_ALPHA * OVERLAY_RGB
    else:
        rgb = (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * class_colours(num_classes)[mask]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _display_rgb(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` float32 in [0, 1] for display: 3 channels as RGB, else channel 0 contrast-stretched as grey."""
    if image.shape[0] == 3:
        return np.moveaxis(image, 0, -1).astype(np.float32)
    grey = image[0].astype(np.float32)
    # Contrast stretch for display only: 16-bit EM often fills a small part of its range.
    lo, hi = np.percentile(grey, (0.5, 99.5))
    grey = np.clip((grey - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(grey)
    return np.repeat(grey[..., None], 3, axis=-1)
