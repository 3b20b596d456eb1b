"""Ensembles of checkpoints: several UNets that predict as one by averaging their class probabilities.

:class:`Ensemble` is a ``torch.nn.Module`` whose forward returns ``log(mean_m softmax(model_m(x)))``, so
the softmax that every predictor applies downstream (:func:`unet.prediction.predictor.predict_probabilities`) yields the
mean probability of the members, and tiling, TTA (the mean over flips of the mean over models) and
autocast work on it unchanged. Whatever prediction reads from a UNet (``config``, ``padding``,
``edge_band``, ``output_size``, ...) is the first member's: :func:`load_ensemble` refuses members that
disagree in the settings that make their outputs comparable tile by tile.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import torch

from unet.checkpoint import load_model
from unet.errors import UserError

__all__ = ["Ensemble", "load_ensemble", "MUST_AGREE"]

# Model settings every member must share: the same tiles in, the same classes out, pixel for pixel.
MUST_AGREE = ("padding", "depth", "in_channels", "num_classes")


class Ensemble(torch.nn.Module):
    """Several models as one: the log of their mean softmax.

    Args:
        models: UNets sharing :data:`MUST_AGREE` (checked by :func:`load_ensemble`, not here).
    """

    def __init__(self, models: Sequence[torch.nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, K, h, w)`` float32 log of the mean class probability over the models."""
        # float32 before the softmax: under autocast the members' logits may be bf16/fp16.
        log_probs = torch.stack([m(x).float().log_softmax(1) for m in self.models])
        return torch.logsumexp(log_probs, 0) - math.log(len(self.models))

    @property
    def config(self):
        """The first member's config, with the widest member's ``base_filters``.

        The members run one after another, so the peak activation memory (which the tiler estimates from
        ``base_filters``) is the widest member's.
        """
        first = self.models[0].config
        widest = max(m.config.base_filters for m in self.models)
        return dataclasses.replace(first, base_filters=widest)

    @property
    def padding(self) -> str:
        return self.models[0].padding

    @property
    def edge_band(self) -> int:
        return self.models[0].edge_band

    def output_size(self, input_size: int) -> int:
        return self.models[0].output_size(input_size)

    def valid_input_size(self, min_size: int) -> int:
        return self.models[0].valid_input_size(min_size)

    def input_size_for_output(self, min_output: int) -> int:
        return self.models[0].input_size_for_output(min_output)


def _check_members(configs: list, paths: list[Path]) -> None:
    for path, cfg in zip(paths[1:], configs[1:]):
        for key in MUST_AGREE:
            a, b = getattr(configs[0], key), getattr(cfg, key)
            if a != b:
                raise UserError(f"checkpoints {paths[0]} and {path} cannot form an ensemble: {key} {a} vs {b}; "
                                f"ensemble only models with the same {', '.join(MUST_AGREE)}")


def load_ensemble(paths: Sequence[str | Path]) -> tuple[torch.nn.Module, list[dict]]:
    """Load checkpoints as one model: the UNet itself for one path, an :class:`Ensemble` for several.

    Args:
        paths: checkpoint files written by train.py.

    Returns:
        ``(model in eval mode on CPU, the checkpoint dicts in the order of paths)``.

    Raises:
        UserError: a checkpoint that cannot be loaded, or two that disagree in :data:`MUST_AGREE` (both named).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("load_ensemble needs at least one checkpoint path")
    loaded = [load_model(p) for p in paths]
    models, ckpts = [m for m, _ in loaded], [c for _, c in loaded]
    _check_members([m.config for m in models], paths)
    if len(models) == 1:
        return models[0], ckpts
    return Ensemble(models).eval(), ckpts
