"""Learning-rate schedules as a pure function of the optimizer step.

``constant`` is UNet_Medical's (Adam at a fixed rate); ``cosine`` (half a cosine from the peak to zero, as
torchvision's references and timm) and ``poly`` ((1 - t)^0.9, nnU-Net's) decay it over ``max_steps``; any of
them can start with a linear warm-up. Why not ``torch.optim.lr_scheduler``: the rate here depends on the step
alone, so resuming (including an elastic restart, or a checkpoint from before schedules existed) needs no
scheduler state in the checkpoint and cannot drift from it; the trainer writes the rate into the optimizer's
param groups before each step.
"""
from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "poly")
POLY_EXPONENT = 0.9  # nnU-Net's


def learning_rate_at(step: int, *, peak: float, max_steps: int, schedule: str = "constant",
                     warmup_steps: int = 0) -> float:
    """The learning rate of optimizer step ``step`` (1-based: the first step is 1).

    Args:
        step: the step about to be taken, 1 .. ``max_steps``.
        peak: the rate after warm-up (``--learning-rate``).
        max_steps: the run's length; decaying schedules reach zero after the last step.
        schedule: one of :data:`LR_SCHEDULES`.
        warmup_steps: steps 1 .. ``warmup_steps`` rise linearly from ``peak / warmup_steps`` to ``peak``.

    Returns:
        The rate (a float >= 0).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if step <= warmup_steps:
        return peak * step / warmup_steps
    if schedule == "constant":
        return peak
    # Fraction of the decay done *before* this step: the first decaying step runs at the peak.
    t = min((step - 1 - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * t))
    return peak * (1.0 - t) ** POLY_EXPONENT
