"""scripts/simulate_ranks.py (issue 20): many gloo ranks of the block-wise path, some SIGKILLed mid-run, then
--resume; and its checks, fed hand-made logs, find each violation they are there for."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from script_modules import load_script
from unet.device import setup_device
from unet.model import UNet
from unet.prediction.predictor import tile_predictor
from unet.prediction.tiles import predict_slice
from unet.prediction.tiling import TilingOptions

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "simulate_ranks.py"


@pytest.fixture(scope="module")
def sim():
    """The script as a module (its checks and stand-in; the processes are only started by running it)."""
    yield load_script(SCRIPT, "simulate_ranks")
    del sys.modules["simulate_ranks"]


@pytest.mark.slow  # 16 + 6 processes, forked from one that imported torch
def test_sixteen_ranks_four_killed_then_six_resume(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "sim"), "--timeout", "120"],
                          capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert lines["blocks"] == "256; ranks: 16, then 6 for --resume"
    assert lines["killed"].startswith("4 (ranks 0, 4, 8, 12;")
    # Each survivor records its 16 blocks, each victim its 2 (--kill-after) before it dies: 12 x 16 + 4 x 2.
    assert lines["recorded before the resume"] == "200"
    # Ranks 4 and 12 kill themselves between the mask and the probabilities of their third block (4 + 2 x 16,
    # 12 + 2 x 16); ranks 0 and 8 die inside the forward of theirs, which wrote nothing.
    assert lines["redone"] == "2 (blocks in flight at a kill: [36, 44])"
    assert lines["blocks written per rank, run 1"] == str([2, 16, 16, 16, 3, 16, 16, 16] * 2)
    # The 56 unrecorded blocks are the victims' (index = 0 mod 4); the resume deals out the remaining blocks in
    # turn, so its 6 ranks get 10, 10, 9, 9, 9, 9 (dealt by index modulo 6 they would go to the even ranks only).
    assert lines["blocks written per rank, resume"] == "[10, 10, 9, 9, 9, 9]"
    assert lines["written exactly once"] == "yes"
    assert "violation" not in done.stdout and done.stderr == ""
    assert sorted(p.name for p in (tmp_path / "sim").iterdir()) == ["em.ome.zarr", "logs", "masks.zarr", "probs.zarr"]


def test_the_stand_in_gives_the_expected_outputs(sim):
    """Through the real tiler and tile predictor (softmax), on a slice that takes several tiles: what the checks
    compare the simulated runs' outputs with."""
    images = np.random.default_rng(3).integers(0, 256, (1, 96, 128), dtype=np.uint8)
    model = UNet(base_filters=2, depth=2, padding="valid").eval()
    dev = setup_device("cpu")
    probs = predict_slice(tile_predictor(model, dev, sim.StandIn(model, 0.0)), torch.from_numpy(images / 255.0).float(),
                          TilingOptions(tile_size=sim.TILE, tile_batch=1), geometry=model)
    masks, cell = sim.expected_outputs(images)
    np.testing.assert_array_equal(np.where(probs[1] > probs[0], 255, 0), masks[0])
    np.testing.assert_allclose(probs[1].numpy(), cell[0], rtol=0, atol=1e-6)
    assert 0.4 < (masks == 255).mean() < 0.6


def _log(*events: str) -> list[tuple[str, ...]]:
    return [tuple(e.split()) for e in events]


def _block(b: int) -> list[str]:
    return [f"write masks {b}", f"write probs {b}", f"mark {b}"]


# Two ranks, four blocks; rank 0 is killed after block 0 with block 2's mask written; the resume does 2 and 3.
GOOD_FIRST = {0: _log(*_block(0), "write masks 2"), 1: _log(*_block(1), *_block(3))}
GOOD_SECOND = {0: _log(*_block(2))}


def test_the_checks_pass_a_run_that_keeps_the_rules(sim):
    assert sim._check_records({0, 1, 3}, GOOD_FIRST, GOOD_SECOND, 4) == []
    problems, redone = sim._check_writes({0, 1, 3}, GOOD_FIRST, GOOD_SECOND, 4, [0])
    assert problems == [] and redone == {2}


@pytest.mark.parametrize("first, second, before, found", [
    # A record made before the block's probabilities were written.
    ({0: _log("write masks 0", "mark 0", "write probs 0"), 1: _log(*_block(1), *_block(3))}, {0: _log(*_block(2))},
     {0, 1, 3}, "a block was recorded before both of its writes"),
    # A block recorded by both runs.
    (GOOD_FIRST, {0: _log(*_block(2), *_block(3))}, {0, 1, 3}, "blocks recorded twice: [3]"),
    # A block nobody recorded.
    (GOOD_FIRST, {0: _log("write masks 2", "write probs 2")}, {0, 1, 3}, "blocks never recorded: [2]"),
    # A record the log saw made that is not on disk.
    (GOOD_FIRST, GOOD_SECOND, {1, 3}, "logged records missing on disk: [0]"),
])
def test_the_record_checks_find_each_violation(sim, first, second, before, found):
    assert found in sim._check_records(before, first, second, 4)


@pytest.mark.parametrize("first, second, victims, found", [
    # The resume writes a block that was recorded.
    (GOOD_FIRST, {0: _log(*_block(2)), 1: _log("write masks 3", "write probs 3")}, [0],
     "recorded blocks written again by the resume: [3]"),
    # A block written twice by one run.
    ({0: _log(*_block(0), "write masks 2"), 1: _log(*_block(1), *_block(1), *_block(3))}, GOOD_SECOND, [0],
     "blocks written twice within one run: [1]"),
    # Block 2 written by both runs although its rank (0) was not killed.
    (GOOD_FIRST, GOOD_SECOND, [1], "blocks written by both runs [2] are not one in flight per killed rank"),
    # A block nobody wrote.
    ({0: _log(*_block(0)), 1: _log(*_block(1), *_block(3))}, {0: _log("mark 2")}, [0], "blocks never written: [2]"),
])
def test_the_write_checks_find_each_violation(sim, first, second, victims, found):
    problems, _ = sim._check_writes({0, 1, 3}, first, second, 4, victims)
    assert found in problems
