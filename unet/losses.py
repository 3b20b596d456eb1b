"""NVIDIA UNet_Medical's training loss: softmax cross-entropy + (1 - soft Dice).

UNet_Medical (TensorFlow) computes, on logits flattened to ``(N, pixels, K)``:

    ce   = mean over pixels and images of softmax_cross_entropy(logits, onehot)
    dice = (2 * sum_px(p * t) + eps) / (sum_px(p * p + t * t) + eps)    per image and class
    loss = ce + mean over images and classes of (1 - dice)

with ``p`` the softmax probabilities, ``t`` the one-hot target and ``eps = 1e-6``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unet.metrics.dice import soft_dice

__all__ = ["ce_dice_loss", "weighted_cross_entropy"]


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Softmax cross-entropy plus mean (1 - soft Dice), as in NVIDIA UNet_Medical.

    Computed in float32 even under autocast: low-precision sums over 10^5 pixels lose the Dice signal.

    Args:
        logits: raw class scores ``(N, K, H, W)`` (any float dtype).
        target: class indices ``(N, H, W)``, integer dtype, values in ``[0, K)``.
        eps: soft Dice smoothing term.

    Returns:
        Scalar float32 loss ``CE + mean_{n,k}(1 - dice[n, k])``.
    """
    if logits.dim() != 4 or target.dim() != 3 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"expected logits (N, K, H, W) and target (N, H, W), "
                         f"got {tuple(logits.shape)} and {tuple(target.shape)}")
    if target.is_floating_point():
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    num_classes = logits.shape[1]
    # Upcasting is enough: autocast keeps softmax / cross-entropy in float32 and never lowers
    # elementwise ops or sums, so everything below stays float32 without touching device-specific autocast.
    logits = logits.float()
    target = target.long()
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2).float()
    dice = soft_dice(probs, onehot, eps)
    return ce + (1 - dice).mean()


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The UNet paper's loss: pixel-wise cross-entropy weighted by a weight map (Ronneberger et al., eq. 1).

    ``loss = mean over images and pixels of w(x) * (-log softmax(logits)[target(x)])``: the paper's energy
    divided by the pixel count, so weights of 1 give plain ``F.cross_entropy``. Computed in float32 (see
    :func:`ce_dice_loss`).

    Args:
        logits: raw class scores ``(N, K, H, W)``.
        target: class indices ``(N, H, W)``, integer dtype.
        weights: per-pixel weights ``(N, H, W)`` (e.g. :func:`unet.weight_map.unet_weight_map`), >= 0.

    Returns:
        Scalar float32 loss.
    """
    if logits.dim() != 4 or target.dim() != 3 or target.shape != logits.shape[:1] + logits.shape[2:] \
            or weights.shape != target.shape:
        raise ValueError(f"expected logits (N, K, H, W), target and weights (N, H, W), got "
                         f"{tuple(logits.shape)}, {tuple(target.shape)} and {tuple(weights.shape)}")
    if target.is_floating_point():
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    per_pixel = F.cross_entropy(logits.float(), target.long(), reduction="none")
    return (weights.float() * per_pixel).mean()
