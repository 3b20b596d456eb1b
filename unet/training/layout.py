"""The memory layout a training run uses (``--memory-format``): channels_last or contiguous (NCHW).

On CUDA channels_last is the fast layout (cuDNN's tensor-core kernels) and on the NPU NCHW is
(:func:`unet.device.setup_device`). On the CPU no rule by chip fits: on a 2-core AVX2 AMD EPYC (2026-12-03),
oneDNN's fp32 convolution *backward* in channels_last took 15.9 s per 572x572 image of the reference model
against 7.0 s in NCHW (the forward was equal), so NCHW trained it 1.7x faster; on the same chip channels_last
trained the small model (base 16, 256x256) 1.15x faster (docs/benchmarks.md). So ``auto`` on the CPU times one
training step in each layout at the run's own batch and crop before the first step, and keeps the faster
one: a few steps' cost once, against a run of hundreds or thousands. The choice is stored in the checkpoint,
and a resumed run keeps it (no second probe, and the same arithmetic as before the interruption).
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch

from unet.device import DeviceSetup

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
LAYOUT_CHOICES = ("auto", *MEMORY_FORMATS)
# Timed steps per layout after the untimed first one (oneDNN creates its primitives there, in milliseconds); the
# faster of them counts. A step under MIN_TIMED_S is repeated up to MAX_REPEATS times, so tiny models are not timed
# by noise; a first step over LONG_STEP_S is timing enough (its set-up share is small), so big models cost one
# step per layout.
MIN_TIMED_S, MAX_REPEATS, LONG_STEP_S = 0.2, 5, 2.0


def layout_name(memory_format: torch.memory_format) -> str:
    return next(name for name, fmt in MEMORY_FORMATS.items() if fmt == memory_format)


def step_seconds(model: torch.nn.Module, batch: torch.Tensor, dev: DeviceSetup,
                 clock: Callable[[], float] = time.perf_counter) -> float:
    """The fastest of a few forward + backward passes of ``model`` on ``batch`` (after an untimed first one,
    unless that one was long)."""
    best, spent = float("inf"), 0.0
    for k in range(MAX_REPEATS + 1):
        start = clock()
        with dev.autocast():
            out = model(batch)
        out.float().sum().backward()
        dev.synchronize()
        took = clock() - start
        model.zero_grad(set_to_none=True)
        if k == 0 and took < LONG_STEP_S:
            continue
        best, spent = min(best, took), spent + took
        if spent >= MIN_TIMED_S:
            break
    return best


def measure_layouts(model: torch.nn.Module, dev: DeviceSetup, batch_shape: tuple[int, ...]) -> dict[str, float]:
    """Seconds of one training step (forward + backward, the run's autocast) in each layout.

    The model is left as it was: weights, BatchNorm statistics and gradients are restored, and torch's random
    stream (dropout) is untouched, so the run that follows is the one it would have been without the probe.
    """
    state = copy.deepcopy(model.state_dict())
    times = {}
    with torch.random.fork_rng(devices=[]):
        model.train()
        for name, fmt in MEMORY_FORMATS.items():
            model.to(dev.device, memory_format=fmt)
            batch = torch.rand(batch_shape, device=dev.device).contiguous(memory_format=fmt)
            times[name] = step_seconds(model, batch, dev)
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    return times


def choose_layout(requested: str, recorded: str | None, model: torch.nn.Module, dev: DeviceSetup,
                  batch_shape: tuple[int, ...], measure=None) -> tuple[str, str | None]:
    """The run's layout and, when it was measured now, the line that says so.

    Args:
        requested: ``--memory-format`` (``auto``, ``channels_last`` or ``contiguous``).
        recorded: the layout a resumed run's checkpoint used (None for a new run or an older checkpoint).
        model: the model (on the CPU) to time.
        dev: the device setup (its ``memory_format`` is the device's default).
        batch_shape: ``(batch, channels, size, size)`` of a training step.
        measure: ``measure_layouts`` by default (tests inject times).

    Returns:
        ``(name, line)``: the layout's name and a line for the user, or None when nothing was measured.
    """
    if requested != "auto":
        return requested, None
    if recorded is not None:
        return recorded, None
    if dev.type != "cpu":
        return layout_name(dev.memory_format), None
    times = (measure or measure_layouts)(model, dev, batch_shape)
    best = min(times, key=times.get)
    others = ", ".join(f"{t:.2f} s in {name}" for name, t in times.items() if name != best)
    return best, (f"memory layout {best}: one training step took {times[best]:.2f} s, {others} (measured on this "
                  f"CPU; --memory-format pins it)")
