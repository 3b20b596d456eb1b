"""Tile plans chosen by measured speed on the device, not by FLOPs alone.

The fewest-FLOP tiling (:func:`unet.prediction.tiling.choose_tile_size`) takes the largest tile that fits the
memory budget, which is right on a GPU but not on a CPU: once a forward pass's activations leave the caches, a
pixel costs more (small model, bf16, 2 cores: 92 ns per output pixel at 1024x1024 tiles, 250 at 2048x2048,
and an 8192x8192 slice took 38 s in whole-slice tiles against 15 s in 1024-pixel ones). So infer.py times a
few candidate plans on the device, as cuDNN's benchmark mode times algorithms, and keeps the fastest.

Candidates are tiles whose output is about 256, 362, 512, 724, ... pixels wide (each sqrt(2) larger) up to the
fewest-FLOP tile of the memory budget, each at one tile per forward and at the configured tile batch, leaving out
those with 2x the fewest-FLOP plan's compute or more. They are timed from the smallest up, so a plan whose
one forward takes longer than the whole probe may is never run; the search stops when two larger candidates
in a row are slower than the best, or when the next one would overrun the probe's share of the job's
estimated time. A candidate replaces the best only when it is clearly (5 %) faster, so that timing noise does
not swap near-equal plans. Outputs of ``valid`` models do not depend on the plan; those of ``same`` models
do (the blend of overlapping windows), so the chosen plan is printed and ``--tile-size``/``--tile-batch``
pin it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from unet.prediction.tiling import TilePlan, TilingOptions, choose_tile_size, plan_tiles, tile_batch_size

__all__ = ["PlanChoice", "candidate_tile_sizes", "fastest_plan", "time_call", "PROBE_SHARE", "MIN_PROBE_SECONDS"]

SMALLEST_OUTPUT = 256
# The probe may spend this share of the job's estimated prediction time (but at least MIN_PROBE_SECONDS).
PROBE_SHARE = 0.05
MIN_PROBE_SECONDS = 0.5
CLEARLY_FASTER = 0.95  # a candidate must be 5 % faster to replace the best
GIVE_UP_AFTER = 2  # consecutive larger candidates slower than the best
FLOP_SLACK = 2.0  # candidates with this times the fewest-FLOP plan's compute or more are not timed


@dataclass(frozen=True)
class PlanChoice:
    """The chosen plan, its tiles per forward pass, and what was measured on the way.

    Attributes:
        plan: the tiling of one slice.
        batch: tiles per forward pass.
        seconds_per_slice: the measured estimate for the chosen plan (None: chosen by FLOPs).
        measured: ``(tile size, batch, seconds per slice)`` of every timed candidate, in timing order.
        probe_seconds: time spent measuring.
        only: the speed probe had a single candidate and timed nothing.
    """

    plan: TilePlan
    batch: int
    seconds_per_slice: float | None = None
    measured: tuple[tuple[int, int, float], ...] = field(default=())
    probe_seconds: float = 0.0
    only: bool = False

    def __str__(self) -> str:
        if self.only:
            return f"{self.plan}, {self.batch} per forward (the only candidate: nothing timed)"
        if self.seconds_per_slice is None:
            return f"{self.plan}, {self.batch} per forward (fewest FLOPs)"
        return (f"{self.plan}, {self.batch} per forward (fastest of {len(self.measured)} timed plans: "
                f"{self.seconds_per_slice:.3g} s per slice; probe {self.probe_seconds:.1f} s)")


def candidate_tile_sizes(height: int, width: int, geometry, options: TilingOptions) -> list[int]:
    """Tile sizes to time, ascending: tiles whose output is about 256, 362, 512, 724, ... pixels wide (factors
    of sqrt(2)), below the fewest-FLOP tile of the whole memory budget (today's default), which comes last."""
    full = choose_tile_size(height, width, geometry, options).tile_size  # refuses a budget too small for any
    sizes, rung = {full}, float(SMALLEST_OUTPUT)
    while True:
        size = geometry.input_size_for_output(int(rung))
        if size >= full:
            return sorted(sizes)
        sizes.add(size)
        rung *= math.sqrt(2)


def fastest_plan(height: int, width: int, geometry, options: TilingOptions,
                 time_forward: Callable[[int, int], float], *, slices: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> PlanChoice:
    """The candidate plan with the least measured time per slice.

    Only candidates within :data:`FLOP_SLACK` of the fewest-FLOP plan's compute are timed (a ``valid`` model's
    small tiles spend most of their input on the margin and cannot win), smallest first; before each one the
    probe checks that its likely cost (the last candidate's, scaled by tile area) still fits the allowance.

    Args:
        height, width: slice size.
        geometry: the network's size arithmetic.
        options: overlap, tile batch and the memory budget that caps every candidate.
        time_forward: ``(tile size, batch) -> seconds`` of one forward pass of that many tiles on the device.
        slices: slices the job will predict (the probe spends at most :data:`PROBE_SHARE` of their time).
        clock: seconds now (the probe's own time is read from it).

    Returns:
        the :class:`PlanChoice`; nothing is timed when there is only one candidate and one batch.
    """
    plans = [plan_tiles(height, width, geometry, size, options)
             for size in candidate_tile_sizes(height, width, geometry, options)]
    least = min(_flops(p) for p in plans)
    plans = [p for p in plans if _flops(p) < FLOP_SLACK * least]
    if len(plans) == 1 and len(_batches(plans[0], geometry, options)) == 1:
        return PlanChoice(plans[0], 1, only=True)  # nothing to choose between: no time spent
    started = clock()
    best, measured, worse, last = None, [], 0, None
    for plan in plans:
        spent = clock() - started
        if best is not None:
            allowance = max(MIN_PROBE_SECONDS, PROBE_SHARE * slices * best[2])
            if worse >= GIVE_UP_AFTER or spent + last[1] * (plan.tile_size / last[0]) ** 2 > allowance:
                break
        here = None
        for batch in _batches(plan, geometry, options):
            seconds = time_forward(plan.tile_size, batch) * math.ceil(plan.num_tiles / batch)
            measured.append((plan.tile_size, batch, seconds))
            here = min(here or (plan, batch, seconds), (plan, batch, seconds), key=lambda c: c[2])
            if best is None or seconds < CLEARLY_FASTER * best[2]:
                best = (plan, batch, seconds)
        # slower than the best: one step towards giving up; clearly faster: a fresh start; near-equal: neither
        worse = 0 if here is best else worse + (here[2] > best[2])
        last = (plan.tile_size, clock() - started - spent)
    return PlanChoice(best[0], best[1], best[2], tuple(measured), clock() - started)


def _flops(plan: TilePlan) -> int:
    """Compute of a plan in tile pixels (convolution FLOPs are proportional to it for one network)."""
    return plan.tile_size ** 2 * plan.num_tiles


def _batches(plan: TilePlan, geometry, options: TilingOptions) -> list[int]:
    """One tile per forward, and the configured tile batch (capped by the budget and the tiles there are)."""
    full = min(tile_batch_size(plan, geometry, options), max(plan.num_tiles, 1))
    return [1] if full <= 1 else [1, full]


def time_call(call: Callable[[], object], synchronize: Callable[[], None], *, min_seconds: float = 0.05,
              max_calls: int = 3, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one call after an untimed first one: the least of up to ``max_calls`` timed calls, stopping
    once ``min_seconds`` have passed (fast calls are repeated against timer noise; slow ones run once)."""
    call()
    synchronize()
    best, total = math.inf, 0.0
    for _ in range(max_calls):
        t0 = clock()
        call()
        synchronize()
        dt = clock() - t0
        best, total = min(best, dt), total + dt
        if total >= min_seconds:
            break
    return best
