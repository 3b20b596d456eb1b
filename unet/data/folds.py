"""Train/validation splits of a slice set for k-fold cross-validation."""
from __future__ import annotations

from collections import deque

import numpy as np

from unet.errors import UserError

SCHEMES = ("disjoint", "nvidia")


def fold_indices(n: int, fold: int | None, folds: int = 5, scheme: str = "disjoint",
                 seed: int = 0) -> tuple[list[int], list[int]]:
    """Training and validation slice indices of one fold.

    Schemes:
        ``disjoint``: a seeded permutation cut into ``folds`` near-equal parts; fold k validates part k,
        so every slice is validated exactly once over all folds.
        ``nvidia``: NVIDIA UNet_Medical's split, reproduced exactly (legacy ``np.random.seed(seed)``
        shuffle, rotated by ``fold * int((1 - 0.8) * n)``, last ``n - int(0.8 * n)`` validate). In floating
        point ``(1 - 0.8) * 30`` is 5.999..., so for ISBI's 30 slices the rotation is 5 while 6 slices
        validate: folds overlap and slices 2, 10, 13 and 28 are never validated. ``folds`` is ignored.

    Args:
        n: number of slices.
        fold: fold number in ``[0, folds)``; None trains on all ``n`` slices with no validation.
        folds: number of folds (``disjoint``).
        scheme: ``disjoint`` or ``nvidia``.
        seed: permutation seed (NVIDIA used 0).

    Returns:
        ``(train, val)`` lists of indices.

    Raises:
        UserError: unknown scheme, or fold out of range.
    """
    if scheme not in SCHEMES:
        raise UserError(f"--fold-scheme {scheme!r} is not known; use one of {', '.join(SCHEMES)}")
    if n < 1:
        raise UserError("the data set has no slices to split into folds")
    if fold is None:
        return list(range(n)), []
    if scheme == "nvidia":
        # NVIDIA's ratio arithmetic is float; replicate it literally rather than "fix" it.
        ratio = 0.8
        if not 0 <= fold < 5:
            raise UserError(f"--fold {fold} is out of range; the nvidia scheme has folds 0 to 4")
        idx = np.arange(n)
        np.random.RandomState(seed).shuffle(idx)
        rotated = deque(idx.tolist())
        rotated.rotate(fold * int((1.0 - ratio) * n))
        idx = list(rotated)
        cut = int(ratio * n)
        return [int(i) for i in idx[:cut]], [int(i) for i in idx[cut:]]
    if folds < 2 or folds > n:
        raise UserError(f"--folds {folds} is not possible with {n} slices; use 2 to {n} folds")
    if not 0 <= fold < folds:
        raise UserError(f"--fold {fold} is out of range; use 0 to {folds - 1} (or no --fold to train on all)")
    perm = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(perm, folds)
    val = sorted(int(i) for i in parts[fold])
    train = sorted(int(i) for k, part in enumerate(parts) if k != fold for i in part)
    return train, val


def parse_slice_range(text: str) -> str:
    """``--val-slices`` text ``A:B`` (slices A to B-1, 0-based, B > A >= 0), as the canonical ``"A:B"``.

    Kept as text so that checkpoints store and compare it as plain data.

    Raises:
        ValueError: with the message the user sees after ``argument --val-slices:``.
    """
    parts = str(text).split(":")
    try:
        start, stop = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"must be A:B (slices A to B-1, e.g. 20:25), got {text!r}") from None
    if not 0 <= start < stop:
        raise ValueError(f"must be A:B with 0 <= A < B, got {text!r}")
    return f"{start}:{stop}"


def slice_range_indices(n: int, text: str, where: str) -> tuple[list[int], list[int]]:
    """Training and validation indices of a contiguous held-out z-range (``--val-slices A:B``).

    Neighbouring EM slices are strongly correlated, so a random slice split leaks; a contiguous block does not
    (apart from its two edges).

    Args:
        n: slices in the data.
        text: ``"A:B"`` (:func:`parse_slice_range`).
        where: the data, for messages.

    Returns:
        (training indices, validation indices A..B-1).

    Raises:
        UserError: the range does not fit the data or leaves nothing to train on.
    """
    start, stop = (int(p) for p in parse_slice_range(text).split(":"))
    if stop > n:
        raise UserError(f"--val-slices {text}: {where} has {n} slices (0 to {n - 1}); pick a range inside them")
    if stop - start == n:
        raise UserError(f"--val-slices {text} holds out all {n} slices of {where}; leave some to train on")
    return [i for i in range(n) if not start <= i < stop], list(range(start, stop))
