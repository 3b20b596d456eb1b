"""Segmentation metrics for whole slices at native resolution, as mergeable accumulators.

Every metric is kept as sums and counts in one float64 vector (:meth:`SegmentationMetrics.state`), so
per-rank accumulators combine exactly with ``dist.all_reduce(state, SUM)`` or :meth:`~SegmentationMetrics.merge`.

Metrics (``compute()`` keys):

* ``dice_nvidia``: NVIDIA UNet_Medical's soft Dice on probabilities (no threshold), per image and class,
  averaged over both classes and all images (the number UNet_Medical reports as its Dice).
* ``dice_<class>``, ``iou_<class>``, ``dice_mean``, ``iou_mean``: hard (argmax) Dice / IoU from the
  confusion counts summed over the whole data set (micro-averaged over pixels, not a mean of per-image
  scores). A class absent from both prediction and truth gives NaN and is left out of the means.
* ``pixel_error``: 1 - pixel accuracy of the argmax prediction, over all pixels of all images.
* ``v_rand``, ``v_info``: the ISBI 2012 challenge's foreground-restricted Rand and information-theoretic
  F-scores (Arganda-Carreras et al. 2015), per image, averaged over images; see :func:`rand_info_scores`.
* ``num_images``: images with at least one scored pixel.

Sparse labels: with ``ignore_index`` set (the label layer's :data:`unet.data.labels.IGNORE`), target pixels of
that value count in nothing: not in the confusion matrix (so not in Dice, IoU or pixel error), not in the soft
Dice sums (``p`` and ``t`` are summed over labelled pixels only, :func:`unet.metrics.dice.soft_dice`), and an
image without a labelled pixel is not counted at all. V_Rand and V_Info need dense truth: their segments are
the connected cells of the truth, which a few scribbles do not draw (two strokes in one cell would be two
"cells", and unlabelled membranes would merge neighbours). So an image with any ignored pixel is left out of
their means, as an image without true cells is; with no dense image they are NaN. Without ``ignore_index``
(the default) every target value must be a class index, and a raw 0/255 mask is refused rather than half
ignored.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from unet.errors import UserError
from unet.metrics.dice import soft_dice
from unet.metrics.cells import label_cells

__all__ = ["SegmentationMetrics", "SummableState", "rand_info_scores"]


class SummableState:
    """Base of the numpy accumulators: sums and counts in one float64 vector ``self._state``, so that the
    states of several accumulators (ranks, slices) add up, e.g. with an all-reduce, to one pass's."""

    _state: np.ndarray

    def state(self) -> np.ndarray:
        """A copy of the float64 sums and counts."""
        return self._state.copy()

    def load_state(self, state) -> None:
        """Replace the sums and counts, e.g. with summed :meth:`state` vectors."""
        state = np.asarray(state, dtype=np.float64)
        if state.shape != self._state.shape:
            raise ValueError(f"state must have shape {self._state.shape}, got {state.shape}")
        self._state = state.copy()


def rand_info_scores(true_labels: np.ndarray, pred_labels: np.ndarray, *,
                     pred_background: str = "singletons", exclude_self_pairs: bool = False) -> dict[str, float]:
    """Foreground-restricted Rand and information-theoretic scores of one segmentation (ISBI 2012).

    Follows the official Fiji implementation (trainableSegmentation ``RandError.foregroundRestrictedStatsN2``
    and ``VariationOfInformation.foregroundRestrictedFscore``) at one fixed segmentation: no threshold sweep
    and no border thinning. Let ``n_ij`` be the number of pixels in true segment ``i`` and predicted segment
    ``j``, counted only where the truth is foreground (true label 0 is ignored: the restriction), ``n`` their
    total, ``a_i = sum_j n_ij`` and ``b_j = sum_i n_ij``; probabilities are ``p = n / n``.

    * V_Rand = 2 * sum p_ij^2 / (sum a_i^2 + sum b_j^2)  (harmonic mean of split and merge scores)
      with V_Rand_split = sum p_ij^2 / sum a_i^2 and V_Rand_merge = sum p_ij^2 / sum b_j^2.
    * V_Info = 2 * I(S;T) / (H(S) + H(T))  (harmonic mean of split and merge scores)
      with V_Info_split = I / H(S), V_Info_merge = I / H(T), I(S;T) = H(S) + H(T) - H(S,T),
      entropies in nats of the restricted distributions (S = prediction, T = truth).

    Predicted label 0 (membrane) inside the true foreground counts, as in Fiji, as one singleton segment
    per pixel; ``pred_background="segment"`` makes it an ordinary segment instead (skimage's convention).
    ``exclude_self_pairs=True`` counts distinct pixel pairs ``n(n-1)`` instead of ``n^2`` (skimage /
    SNEMI3D); with both switched, V_Rand equals ``1 - skimage.metrics.adapted_rand_error(t, s)[0]``.

    Degenerate cases: no true foreground gives NaN for all scores; if both segmentations are a single
    segment (H(S) = H(T) = 0, necessarily identical) V_Info scores are 1 (Fiji reports 0 there).

    Args:
        true_labels: ground-truth segment ids (non-negative ints), 0 = background (ignored).
        pred_labels: predicted segment ids of the same shape, 0 = background (see ``pred_background``).
        pred_background: ``"singletons"`` (ISBI/Fiji) or ``"segment"`` (skimage).
        exclude_self_pairs: count pairs of distinct pixels instead of ordered pairs with repetition.

    Returns:
        dict with ``v_rand``, ``v_rand_split``, ``v_rand_merge``, ``v_info``, ``v_info_split``, ``v_info_merge``.
    """
    if pred_background not in ("singletons", "segment"):
        raise ValueError(f"pred_background must be 'singletons' or 'segment', got {pred_background!r}")
    t = np.asarray(true_labels).ravel()
    s = np.asarray(pred_labels).ravel()
    if t.shape != s.shape:
        raise ValueError(f"label images differ in size: {np.shape(true_labels)} vs {np.shape(pred_labels)}")
    keys = ("v_rand", "v_rand_split", "v_rand_merge", "v_info", "v_info_split", "v_info_merge")
    fg = t > 0
    t, s = t[fg].astype(np.int64), s[fg].astype(np.int64)
    if t.size == 0:
        return dict.fromkeys(keys, math.nan)
    counts = contingency_counts(t, s, singletons=pred_background == "singletons")
    values = _rand_scores(counts, exclude_self_pairs) + _info_scores(counts)
    return {k: float(v) for k, v in zip(keys, values)}


def contingency_counts(t: np.ndarray, s: np.ndarray, singletons: bool) -> tuple:
    """``(n, n_bg, a, b, n_ij)`` of foreground-restricted labels: pixels, predicted-background pixels (when they
    are singletons, else 0), true and predicted segment sizes, and the non-zero contingency entries."""
    n = t.size
    # True segment sizes include the pixels predicted as background.
    a = np.bincount(t).astype(np.float64)
    n_bg = 0
    if singletons:
        n_bg = int(np.count_nonzero(s == 0))
        t, s = t[s > 0], s[s > 0]
    # Non-zero contingency entries (true x predicted, row-major): one np.unique over the pair index. It gives
    # the scipy.sparse coo -> csr table's values bit for bit, faster: rand_info_scores took 4.5 instead of
    # 7.6 ms per thinned 512x512 ISBI slice (2 loaded CPU cores, 2026-11-26). The thinned ISBI scores call
    # it once per threshold.
    _, n_ij = np.unique(t * (int(s.max(initial=0)) + 1) + s, return_counts=True)
    b = np.bincount(s).astype(np.float64)
    return n, n_bg, a[a > 0], b[b > 0], n_ij.astype(np.float64)


def _rand_scores(counts: tuple, exclude_self_pairs: bool) -> tuple[float, float, float]:
    """V_Rand, split, merge; every predicted-background pixel is its own segment, adding 1 to sum b^2 and to
    sum n_ij^2."""
    n, n_bg, a, b, n_ij = counts
    sum_ab2 = n_ij @ n_ij + n_bg
    sum_a2 = a @ a
    sum_b2 = b @ b + n_bg
    if exclude_self_pairs:  # each of the three sums has total mass n
        sum_ab2, sum_a2, sum_b2 = sum_ab2 - n, sum_a2 - n, sum_b2 - n
    return _ratio(2 * sum_ab2, sum_a2 + sum_b2), _ratio(sum_ab2, sum_a2), _ratio(sum_ab2, sum_b2)


def _info_scores(counts: tuple) -> tuple[float, float, float]:
    """V_Info, split, merge; a singleton has probability 1/n and adds (1/n) log n to H(S) and to H(S,T)."""
    n, n_bg, a, b, n_ij = counts

    def entropy(c: np.ndarray) -> float:
        p = c / n
        return float(-(p * np.log(p)).sum())

    h_bg = n_bg / n * math.log(n)
    h_t = entropy(a)
    h_s = entropy(b) + h_bg
    h_st = entropy(n_ij) + h_bg
    mutual = h_s + h_t - h_st
    if h_s == 0 and h_t == 0:
        return 1.0, 1.0, 1.0
    return 2 * mutual / (h_s + h_t), _ratio(mutual, h_s), _ratio(mutual, h_t)


def _ratio(num: float, den: float) -> float:
    """num / den, with 0 / 0 -> NaN and x / 0 -> 0 (an entropy of 0 against a non-zero one)."""
    if den == 0:
        return math.nan if num == 0 else 0.0
    return float(num / den)


class SegmentationMetrics:
    """Accumulates Dice, IoU, soft Dice, pixel error, V_Rand and V_Info over whole slices.

    Feed it full-resolution predictions slice by slice; combine ranks by summing :meth:`state` tensors.

    Args:
        num_classes: number of classes of the probability maps.
        class_names: one name per class, used in the ``dice_<name>`` / ``iou_<name>`` keys.
        foreground_class: the class whose 4-connected components are the segments scored by V_Rand / V_Info
            (the cell interior); all other classes are boundary/background.
        ignore_index: target value of unlabelled pixels, scored nowhere (see the module docstring); None:
            every pixel is labelled, and any value outside ``0..K-1`` is refused.

    Example:
        >>> m = SegmentationMetrics()
        >>> m.update(probs, target)            # (2, H, W) probabilities, (H, W) class indices
        >>> m.compute()["v_rand"]
    """

    def __init__(self, num_classes: int = 2, class_names: Sequence[str] = ("membrane", "cell"),
                 foreground_class: int = 1, ignore_index: int | None = None):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        if not 0 <= foreground_class < num_classes:
            raise ValueError(f"foreground_class {foreground_class} is not a class index < {num_classes}")
        self.num_classes = num_classes
        self.class_names = tuple(class_names)
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class index < {num_classes}")
        self.foreground_class = foreground_class
        self.ignore_index = ignore_index
        k = num_classes
        # Layout of the state vector: [num_images | soft dice sums (K) | confusion (K*K, true-major) |
        #                              v_rand sum, v_rand count | v_info sum, v_info count]
        self._slices = {"num_images": slice(0, 1), "soft_dice": slice(1, 1 + k),
                        "confusion": slice(1 + k, 1 + k + k * k), "v_rand": slice(1 + k + k * k, 3 + k + k * k),
                        "v_info": slice(3 + k + k * k, 5 + k + k * k)}
        self._size = 5 + k + k * k
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._state = torch.zeros(self._size, dtype=torch.float64)

    def state(self) -> torch.Tensor:
        """A copy of the accumulated sums and counts: 1-D float64 CPU tensor, summable across ranks."""
        return self._state.clone()

    def load_state(self, state: torch.Tensor) -> None:
        """Replace the accumulated sums and counts, e.g. with an all-reduced :meth:`state`."""
        if state.dim() != 1 or state.numel() != self._size:
            raise ValueError(f"state must be a 1-D tensor of {self._size} values, got shape {tuple(state.shape)}")
        self._state = state.detach().to("cpu", torch.float64).clone()

    def merge(self, other: "SegmentationMetrics") -> "SegmentationMetrics":
        """Add another accumulator's sums and counts into this one; returns self."""
        if (other.num_classes, other.foreground_class, other.ignore_index) != \
                (self.num_classes, self.foreground_class, self.ignore_index):
            raise ValueError("cannot merge accumulators with different classes")
        self._state += other._state
        return self

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add whole slices.

        Args:
            probs: class probabilities ``(K, H, W)`` or ``(N, K, H, W)`` at the labels' resolution, any device.
            target: class indices ``(H, W)`` or ``(N, H, W)``, integer dtype, on any device; pixels equal to
                ``ignore_index`` (when set) are unlabelled.

        Raises:
            UserError: when the target holds values that are neither class indices nor ``ignore_index``.
        """
        if probs.dim() == 3:
            probs = probs.unsqueeze(0)
        if target.dim() == 2:
            target = target.unsqueeze(0)
        k = self.num_classes
        if probs.dim() != 4 or probs.shape[1] != k or target.dim() != 3 \
                or probs.shape[:1] + probs.shape[2:] != target.shape:
            raise ValueError(f"expected probs (N, {k}, H, W) and target (N, H, W) of matching size, "
                             f"got {tuple(probs.shape)} and {tuple(target.shape)}")
        if target.is_floating_point():
            raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
        # One host copy serves the range check and the confusion matrix: no device syncs for min / max.
        true = target.cpu().long().numpy()
        labelled = self._labelled(true)
        if self.ignore_index is not None:
            true = np.where(labelled, true, 0)  # a class index everywhere; `labelled` says which pixels count
            target = torch.from_numpy(true)
        target = target.to(probs.device).long()
        probs = probs.float()
        onehot = torch.nn.functional.one_hot(target, k).permute(0, 3, 1, 2).float()
        mask = None if self.ignore_index is None else torch.from_numpy(labelled).to(probs.device)
        # Per-image sums stay float32 on the device (float64 is slow or missing on some accelerators); images add up in float64.
        has_labels = labelled.reshape(len(true), -1).any(1)
        dice = soft_dice(probs, onehot, mask=mask).cpu().double()[torch.from_numpy(has_labels)].sum(0)
        pred = probs.argmax(1).cpu().numpy()
        confusion = np.bincount((true * k + pred)[labelled], minlength=k * k)

        st, sl = self._state, self._slices
        st[sl["num_images"]] += int(has_labels.sum())
        st[sl["soft_dice"]] += dice
        st[sl["confusion"]] += torch.from_numpy(confusion.astype(np.float64))
        for p_img, t_img, l_img in zip(pred, true, labelled):
            if l_img.all():  # V_Rand / V_Info need dense truth (module docstring)
                self._add_rand_info(p_img, t_img)

    def _labelled(self, true: np.ndarray) -> np.ndarray:
        """The pixels that count (not ``ignore_index``), after checking that the rest are class indices."""
        labelled = true != self.ignore_index if self.ignore_index is not None else np.ones(true.shape, bool)
        values = true[labelled]
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo < 0 or hi >= self.num_classes:
            extra = f" or the ignore value {self.ignore_index}" if self.ignore_index is not None else ""
            raise UserError(f"label values must be class indices 0..{self.num_classes - 1}{extra}, found values "
                            f"in [{lo}, {hi}]; convert 0/255 masks to 0/1 before evaluating")
        return labelled

    def _add_rand_info(self, pred: np.ndarray, true: np.ndarray) -> None:
        """Add one dense image's V_Rand / V_Info of the foreground class's cells."""
        fg, st, sl = self.foreground_class, self._state, self._slices
        scores = rand_info_scores(label_cells(true == fg), label_cells(pred == fg))
        for key in ("v_rand", "v_info"):
            if not math.isnan(scores[key]):  # no true cells in this slice: undefined, not counted
                st[sl[key]] += torch.tensor([scores[key], 1.0], dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        """The metrics over everything accumulated (NaN where undefined); see the module docstring."""
        st, sl, k = self._state, self._slices, self.num_classes
        num_images = st[sl["num_images"]].item()
        conf = st[sl["confusion"]].view(k, k).numpy()  # rows: truth, columns: prediction
        tp = np.diag(conf)
        fp = conf.sum(0) - tp
        fn = conf.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
            iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        total = conf.sum()
        out: dict[str, float] = {}
        out["dice_nvidia"] = (st[sl["soft_dice"]].mean().item() / num_images) if num_images else math.nan
        for name, d in zip(self.class_names, dice):
            out[f"dice_{name}"] = float(d)
        out["dice_mean"] = _nanmean(dice)
        for name, v in zip(self.class_names, iou):
            out[f"iou_{name}"] = float(v)
        out["iou_mean"] = _nanmean(iou)
        out["pixel_error"] = float(1 - tp.sum() / total) if total else math.nan
        for key in ("v_rand", "v_info"):
            s, c = st[sl[key]].tolist()
            out[key] = s / c if c else math.nan
        out["num_images"] = int(num_images)
        return out


def _nanmean(x: np.ndarray) -> float:
    """Mean of the non-NaN values; NaN (without a warning) if there are none."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan
