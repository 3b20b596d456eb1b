"""NVIDIA UNet_Medical's training loss: softmax cross-entropy + (1 - soft Dice), and the UNet paper's weighted
cross-entropy; both skip ignored pixels.

UNet_Medical (TensorFlow) computes, on logits flattened to ``(N, pixels, K)``:

    ce   = mean over pixels and images of softmax_cross_entropy(logits, onehot)
    dice = (2 * sum_px(p * t) + eps) / (sum_px(p * p + t * t) + eps)    per image and class
    loss = ce + mean over images and classes of (1 - dice)

with ``p`` the softmax probabilities, ``t`` the one-hot target and ``eps = 1e-6``.

Ignored pixels (target :data:`unet.data.labels.IGNORE`, sparse annotations) count in no term: the
cross-entropy is the mean over labelled pixels only, the soft Dice of an image sums ``p`` and ``t`` over its
labelled pixels only, and an image without a labelled pixel is left out of the Dice mean. A batch without
any labelled pixel gives a loss of exactly 0 with a zero gradient (not the NaN of a mean over nothing),
without a host sync. Targets without IGNORE give bit for bit the losses and gradients of the formulas above.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unet.data.labels import IGNORE
from unet.metrics.dice import soft_dice

__all__ = ["ce_dice_loss", "weighted_cross_entropy"]


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Softmax cross-entropy plus mean (1 - soft Dice), as in NVIDIA UNet_Medical, over labelled pixels.

    Computed in float32 even under autocast: low-precision sums over 10^5 pixels lose the Dice signal.

    Args:
        logits: raw class scores ``(N, K, H, W)`` (any float dtype).
        target: class indices ``(N, H, W)``, integer dtype, values in ``[0, K)`` or :data:`IGNORE`.
        eps: soft Dice smoothing term.

    Returns:
        Scalar float32 loss ``CE + mean_{n,k}(1 - dice[n, k])``, both over labelled pixels (0 if none).
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
    labelled = target != IGNORE
    # F.cross_entropy's mean over nothing is 0/0 = NaN; torch.where picks 0 instead, on the device (no sync),
    # and passes no gradient to the NaN branch (cross_entropy's backward writes nothing for ignored pixels).
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    ce = torch.where(labelled.any(), ce, torch.zeros_like(ce))
    probs = logits.softmax(dim=1)
    # one_hot refuses IGNORE (>= K): give ignored pixels class 0; the mask then removes them from p and t.
    onehot = F.one_hot(target.masked_fill(~labelled, 0), num_classes).permute(0, 3, 1, 2).float()
    dice = soft_dice(probs, onehot, eps, mask=labelled)
    return ce + ((1 - dice) * _labelled_image_weights(labelled)[:, None]).mean()


def _labelled_image_weights(labelled: torch.Tensor) -> torch.Tensor:
    """``(N,)`` weights that turn a mean over all N images into a mean over the images with a labelled pixel.

    An image with no labelled pixel has soft Dice eps / eps = 1 for every class; weight 0 keeps it out
    instead of letting it dilute the others. With every image labelled the weights are exactly 1.0 (N / N),
    so the loss and its gradient are bit-identical to the plain mean.
    """
    has_labels = labelled.flatten(1).any(1)
    return has_labels.float() * _share_of_labelled(has_labels)


def _share_of_labelled(labelled: torch.Tensor) -> torch.Tensor:
    """``numel / count(labelled)`` (1 when nothing is labelled) as a float32 device tensor, exactly 1.0 when all
    are labelled. A tensor division of two equal numbers, because ``int / tensor`` is computed as
    ``int * (1 / tensor)``, which is 0.99999994 for 1748 / 1748 and would break bit-identity."""
    count = labelled.sum().clamp(min=1)
    return torch.full_like(count, labelled.numel()) / count


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The UNet paper's loss: pixel-wise cross-entropy weighted by a weight map (Ronneberger et al., eq. 1).

    ``loss = mean over labelled pixels of w(x) * (-log softmax(logits)[target(x)])``: the paper's energy
    divided by the labelled pixel count, so weights of 1 give plain ``F.cross_entropy(..., ignore_index=IGNORE)``.
    Ignored pixels (:data:`IGNORE`) weigh nothing whatever their weight; no labelled pixel gives 0. Computed in
    float32 (see :func:`ce_dice_loss`).

    Args:
        logits: raw class scores ``(N, K, H, W)``.
        target: class indices ``(N, H, W)``, integer dtype, values in ``[0, K)`` or :data:`IGNORE`.
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
    target = target.long()
    labelled = target != IGNORE
    # reduction="none" gives 0 at ignored pixels; torch.where also drops their weight (even a NaN one).
    per_pixel = F.cross_entropy(logits.float(), target, reduction="none", ignore_index=IGNORE)
    weighted = torch.where(labelled, weights.float(), 0.0) * per_pixel
    # mean over all pixels, rescaled to the labelled ones: the factor is exactly 1.0 when none is ignored.
    return weighted.mean() * _share_of_labelled(labelled)
