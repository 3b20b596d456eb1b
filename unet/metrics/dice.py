"""NVIDIA UNet_Medical's soft Dice, shared by the training loss (:mod:`unet.losses`) and the reported Dice
(:class:`unet.metrics.segmentation.SegmentationMetrics`): a metric, so it lives in the metrics wing and the
loss imports it."""
from __future__ import annotations

import torch

__all__ = ["soft_dice"]


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, eps: float = 1e-6,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice of every image and class, summed over pixels (NVIDIA UNet_Medical's ``dice_coef``).

    With ``mask``, the sums run over the masked-in (labelled) pixels only: ``p`` and ``t`` are multiplied by
    it, so an image whose labels are a few scribbles gets the Dice of those pixels, and an image without a
    labelled pixel gets ``eps / eps = 1`` for every class (callers leave such images out of their means).
    A mask of all ones changes nothing, bit for bit (``x * 1.0 == x``).

    Args:
        probs: per-pixel class probabilities ``(N, K, ...)``.
        onehot: one-hot (or soft) targets of the same shape.
        eps: added to numerator and denominator, so an empty class predicted empty scores 1.
        mask: optional ``(N, ...)`` boolean (or 0/1) map of the pixels to count, the shape of one channel.

    Returns:
        ``(N, K)`` tensor of ``(2 * sum(p * t) + eps) / (sum(p^2) + sum(t^2) + eps)``.
    """
    if probs.shape != onehot.shape or probs.dim() < 2:
        raise ValueError(f"probs {tuple(probs.shape)} and onehot {tuple(onehot.shape)} must both be (N, K, ...)")
    p = probs.flatten(2)
    t = onehot.flatten(2).to(p.dtype)
    if mask is not None:
        if mask.shape != probs.shape[:1] + probs.shape[2:]:
            raise ValueError(f"mask {tuple(mask.shape)} must be (N, ...) of probs {tuple(probs.shape)}")
        m = mask.flatten(1).unsqueeze(1).to(p.dtype)
        p, t = p * m, t * m
    intersection = (p * t).sum(-1)
    union = (p * p).sum(-1) + (t * t).sum(-1)
    return (2 * intersection + eps) / (union + eps)
