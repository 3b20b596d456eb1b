"""The tile plan chosen by measured speed (unet.prediction.plan_speed), with stand-in timers and clocks."""
import numpy as np
import pytest

from tiny_models import balanced_unet
from unet.device import setup_device
from unet.model import UNet
from unet.prediction.pipeline import StackPredictor
from unet.prediction.plan_speed import PROBE_SHARE, candidate_tile_sizes, fastest_plan, time_call
from unet.prediction.tiling import TilingOptions, choose_tile_size, plan_tiles


@pytest.fixture(autouse=True)
def _timed_plans(monkeypatch):
    """conftest gives other tests the fewest-FLOP plan; here StackPredictor times its candidates for real."""
    monkeypatch.setattr("unet.prediction.pipeline.fastest_plan", fastest_plan)


SMALL = UNet(base_filters=8, padding="same")  # size arithmetic only; never run here
REFERENCE = UNet()
BIG_BUDGET = TilingOptions(memory_budget_mb=20000)


class FakeDevice:
    """A timer and a clock in one: each timed forward advances the clock by its own (stand-in) duration."""

    def __init__(self, seconds_per_pixel):
        self.now, self.calls, self.rate = 0.0, [], seconds_per_pixel

    def time_forward(self, tile: int, batch: int) -> float:
        seconds = self.rate(tile, batch) * batch * tile * tile
        self.now += 2 * seconds  # the untimed first call and the timed one
        self.calls.append((tile, batch))
        return seconds

    def clock(self) -> float:
        return self.now


def test_candidates_climb_by_sqrt2_in_output_up_to_the_fewest_flop_tile():
    sizes = candidate_tile_sizes(4096, 4096, SMALL, BIG_BUDGET)
    assert sizes == [256, 368, 512, 736, 1024, 1456, 2048, 2896, 4096]
    assert sizes[-1] == choose_tile_size(4096, 4096, SMALL, BIG_BUDGET).tile_size
    # valid model: tiles named by their output (256 -> a 444 input tile), the last is the budget's best (716: the
    # smallest tile whose edge band falls beyond a 512 slice)
    assert candidate_tile_sizes(512, 512, REFERENCE, BIG_BUDGET) == [444, 556, 700, 716]


def test_a_cost_that_jumps_above_1024_pixels_picks_the_1024_tile():
    # small tiles pay a per-tile overhead, tiles above 1024 pixels leave the caches: 1024 is clearly fastest
    dev = FakeDevice(lambda tile, batch: 1e-9 * (1 + 1000 / tile) if tile <= 1024 else 3e-9)
    choice = fastest_plan(8192, 8192, SMALL, BIG_BUDGET, dev.time_forward, slices=100, clock=dev.clock)
    assert (choice.plan.tile_size, choice.batch) == (1024, 1)  # batch 4 is not 5 % faster: the first stays
    assert choice.seconds_per_slice == pytest.approx(1e-9 * 1.9765625 * 1024 ** 2 * choice.plan.num_tiles)
    # two larger candidates in a row were slower (1456, 2048): the search stopped, no bigger tile was run
    assert max(t for t, _ in dev.calls) == 2048


def test_one_tile_per_forward_wins_when_batching_is_slower_per_tile():
    dev = FakeDevice(lambda tile, batch: 1e-9 if batch == 1 else 1.3e-9)
    choice = fastest_plan(2048, 2048, SMALL, TilingOptions(memory_budget_mb=20000, tile_batch=4),
                          dev.time_forward, slices=100, clock=dev.clock)
    assert choice.batch == 1
    assert (256, 4) in dev.calls and (256, 1) in dev.calls


def test_the_probe_stops_before_a_candidate_that_would_overrun_its_share():
    dev = FakeDevice(lambda tile, batch: 1e-3 / tile)  # larger tiles are always faster per pixel...
    choice = fastest_plan(8192, 8192, SMALL, BIG_BUDGET, dev.time_forward, slices=1, clock=dev.clock)
    first = min(s for t, b, s in choice.measured if t == 256)
    # ...but one slice affords PROBE_SHARE of its time: the probe stays within it and the biggest tiles never run
    assert choice.probe_seconds <= PROBE_SHARE * first
    assert all(t < 4096 for t, _ in dev.calls) and choice.plan.tile_size < 4096
    assert len({t for t, _ in dev.calls}) >= 2  # it did climb while it could afford to


def test_a_valid_model_never_times_tiles_that_spend_their_input_on_the_margin():
    dev = FakeDevice(lambda tile, batch: 1e-9)
    choice = fastest_plan(512, 512, REFERENCE, BIG_BUDGET, dev.time_forward, slices=30, clock=dev.clock)
    # 444, 556 and 700 tiles need 4 or 9 tiles (2.4x the compute of one 716 tile or more): left out, and one
    # candidate is no choice
    assert dev.calls == []
    assert (choice.plan.tile_size, choice.batch, choice.only) == (716, 1, True)
    assert "nothing timed" in str(choice)


@pytest.mark.parametrize("gain, chosen", [(0.97, 256), (0.90, 1024)])
def test_a_larger_tile_replaces_the_first_only_when_clearly_faster(gain, chosen):
    # 1024x1024 slice: candidates within 2x of the fewest FLOPs are 256 (5x5 tiles) and 1024 (one tile)
    flops = {t: t * t * plan_tiles(1024, 1024, SMALL, t, BIG_BUDGET).num_tiles for t in (256, 1024)}
    per_slice = {256: 1.0, 1024: gain}
    dev = FakeDevice(lambda tile, batch: per_slice[tile] / flops[tile])
    choice = fastest_plan(1024, 1024, SMALL, BIG_BUDGET, dev.time_forward, slices=1000, clock=dev.clock)
    assert {t for t, _ in dev.calls} == {256, 1024}
    assert choice.plan.tile_size == chosen


def test_time_call_repeats_fast_calls_and_takes_the_least():
    calls = []
    ticks = iter([0.0, 0.03, 0.0, 0.01, 0.0, 0.02])  # start/stop of three timed calls
    seconds = time_call(lambda: calls.append(1), lambda: None, min_seconds=0.05, max_calls=3,
                        clock=lambda: next(ticks))
    assert seconds == pytest.approx(0.01)
    assert len(calls) == 4  # one untimed, then timed calls until 0.05 s had passed (at the third)
    slow = iter([0.0, 0.2])
    assert time_call(lambda: None, lambda: None, clock=lambda: next(slow)) == pytest.approx(0.2)  # once


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_the_speed_plan_predicts_what_the_flop_plan_predicts_for_a_valid_model_and_runs_for_same(padding):
    model = balanced_unet(padding)
    dev = setup_device("cpu")
    stack = np.random.default_rng(0).integers(0, 255, (2, 300, 300), dtype=np.uint8)
    masks = {}
    for how in ("flops", "speed"):
        got = {}
        predictor = StackPredictor(model, dev, TilingOptions(memory_budget_mb=64), tile_plan=how, slices=2)
        assert predictor.run([stack], lambda k, i, m, p: got.update({k: m.copy()})) == 2
        masks[how] = got
        if how == "speed":
            choice = predictor.choices[(300, 300)]
            assert choice.only or choice.measured
    if padding == "valid":  # a valid model's output does not depend on the tiling
        for k in range(2):
            np.testing.assert_array_equal(masks["speed"][k], masks["flops"][k])
    assert all(m.shape == (300, 300) for m in masks["speed"].values())


def test_a_given_tile_size_or_a_compiled_forward_is_never_probed():
    model = balanced_unet("same")
    dev = setup_device("cpu")
    assert not StackPredictor(model, dev, TilingOptions(tile_size=64), tile_plan="speed").measure
    assert not StackPredictor(model, dev, TilingOptions(), tile_plan="speed", forward=model).measure
    assert StackPredictor(model, dev, TilingOptions(), tile_plan="speed").measure
    with pytest.raises(ValueError, match="tile_plan must be one of"):
        StackPredictor(model, dev, TilingOptions(), tile_plan="fast")
