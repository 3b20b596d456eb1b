"""Ensembles of checkpoints (e.g. the five fold models): one module whose softmax is the mean probability.

``Ensemble(models)`` returns ``log(mean_m softmax(model_m(x)))`` per pixel, so the predictor's usual
``softmax`` downstream gives exactly the mean of the members' probabilities (softmax of a log-probability
vector that sums to one is that vector), and test-time augmentation composes with it as with one UNet.
Everything the tiler and the predictor read from a UNet (``config``, ``padding``, ``edge_band`` and the size
arithmetic) is the first member's; :func:`load_ensemble` refuses members that disagree on any of it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from unet.checkpoint import load_model
from unet.errors import UserError
from unet.model import UNet

# The fields that must agree for the members' tiles and outputs to line up.
MATCHING_FIELDS = ("padding", "depth", "in_channels", "num_classes")


class Ensemble(torch.nn.Module):
    """Several UNets of one geometry as one network returning the log of their mean softmax.

    Args:
        models: the members (at least one), same padding, depth, input channels and classes.
    """

    def __init__(self, models: Sequence[UNet]):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.members = torch.nn.ModuleList(models)

    @property
    def config(self):
        return self.members[0].config

    @property
    def padding(self) -> str:
        return self.members[0].padding

    @property
    def edge_band(self) -> int:
        return self.members[0].edge_band

    def output_size(self, input_size: int) -> int:
        return self.members[0].output_size(input_size)

    def valid_input_size(self, min_size: int) -> int:
        return self.members[0].valid_input_size(min_size)

    def input_size_for_output(self, min_output: int) -> int:
        return self.members[0].input_size_for_output(min_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K, o, o)`` float32 log of the members' mean class probabilities."""
        # log-softmax in float32 (autocast logits may be bf16) and logsumexp: no underflow for confident pixels.
        log_probs = torch.stack([m(x).float().log_softmax(1) for m in self.members])
        return torch.logsumexp(log_probs, 0) - math.log(len(self.members))


def load_ensemble(paths: Sequence[str | Path]) -> tuple[torch.nn.Module, list[dict]]:
    """Load checkpoints as one :class:`Ensemble` (in eval mode, on CPU).

    Args:
        paths: checkpoint files written by ``train.py``.

    Returns:
        ``(ensemble, checkpoint dicts in the order of paths)``.

    Raises:
        UserError: one line for an unreadable checkpoint, or two that disagree on padding, depth,
            input channels or classes (naming both files).
    """
    if not paths:
        raise UserError("no checkpoint given")
    models, ckpts = [], []
    for path in paths:
        model, ckpt = load_model(path)
        if models:
            first = models[0].config
            for name in MATCHING_FIELDS:
                a, b = getattr(first, name), getattr(model.config, name)
                if a != b:
                    raise UserError(f"{path}: {name} is {b!r} but {paths[0]} has {a!r}; an ensemble needs "
                                    f"checkpoints of one geometry ({', '.join(MATCHING_FIELDS)})")
        models.append(model)
        ckpts.append(ckpt)
    return Ensemble(models).eval(), ckpts
