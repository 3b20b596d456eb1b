"""NVIDIA UNet_Medical's soft Dice, shared by the training loss (:mod:`unet.losses`) and the reported Dice
(:class:`unet.metrics.segmentation.SegmentationMetrics`): a metric, so it lives in the metrics wing and the
loss imports it."""
from __future__ import annotations

import torch

__all__ = ["soft_dice"]


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft Dice of every image and class, summed over pixels (NVIDIA UNet_Medical's ``dice_coef``).

    Args:
        probs: per-pixel class probabilities ``(N, K, ...)``.
        onehot: one-hot (or soft) targets of the same shape.
        eps: added to numerator and denominator, so an empty class predicted empty scores 1.

    Returns:
        ``(N, K)`` tensor of ``(2 * sum(p * t) + eps) / (sum(p^2) + sum(t^2) + eps)``.
    """
    if probs.shape != onehot.shape or probs.dim() < 2:
        raise ValueError(f"probs {tuple(probs.shape)} and onehot {tuple(onehot.shape)} must both be (N, K, ...)")
    p = probs.flatten(2)
    t = onehot.flatten(2).to(p.dtype)
    intersection = (p * t).sum(-1)
    union = (p * p).sum(-1) + (t * t).sum(-1)
    return (2 * intersection + eps) / (union + eps)
