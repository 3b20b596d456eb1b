"""Learning-rate schedules: exact values at known steps, warm-up, the end point, refusals."""
import math

import pytest

from unet.training.lr_schedule import LR_SCHEDULES, learning_rate_at


def rates(schedule, max_steps=10, warmup=0, peak=1.0):
    return [learning_rate_at(s, peak=peak, max_steps=max_steps, schedule=schedule, warmup_steps=warmup)
            for s in range(1, max_steps + 1)]


def test_constant_is_the_peak_at_every_step():
    assert rates("constant", peak=1e-4) == [1e-4] * 10


def test_linear_warm_up_reaches_the_peak_at_its_last_step():
    assert rates("constant", warmup=4) == [0.25, 0.5, 0.75] + [1.0] * 7
    assert rates("cosine", warmup=4)[:4] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_known_values():
    # 10 steps, no warm-up: step s runs at (1 + cos(pi (s - 1) / 10)) / 2
    r = rates("cosine")
    assert r[0] == 1.0 and r[5] == pytest.approx(0.5, abs=1e-15)
    assert r == pytest.approx([(1 + math.cos(math.pi * k / 10)) / 2 for k in range(10)], rel=1e-14)
    # after a warm-up of 2, the decay spans the other 8 steps and starts at the peak
    assert rates("cosine", warmup=2)[2:] == pytest.approx([(1 + math.cos(math.pi * k / 8)) / 2 for k in range(8)])


def test_poly_is_nnunets_power_0_9():
    assert rates("poly") == pytest.approx([(1 - k / 10) ** 0.9 for k in range(10)], rel=1e-14)


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_decaying_schedules_fall_monotonically_to_near_zero(schedule):
    r = rates(schedule, max_steps=1000, warmup=50, peak=1e-3)
    decay = r[49:]
    assert all(a >= b for a, b in zip(decay, decay[1:])) and 0 < r[-1] < 1e-5


def test_beyond_max_steps_a_decayed_rate_stays_at_zero():
    assert learning_rate_at(12, peak=1.0, max_steps=10, schedule="cosine") == 0.0
    assert learning_rate_at(12, peak=1.0, max_steps=10, schedule="poly") == 0.0


def test_unknown_schedule_is_refused():
    assert LR_SCHEDULES == ("constant", "cosine", "poly")
    with pytest.raises(ValueError, match="schedule must be one of"):
        learning_rate_at(1, peak=1.0, max_steps=10, schedule="step")
