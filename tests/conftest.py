"""Shared fixtures: the real ISBI 2012 stacks (via ISBI_DIR) and a quiet, deterministic torch."""
import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _fp32_prediction():
    """infer.py / evaluate.py's --precision auto is bf16 on chips with native bf16 (AMX, AVX512_BF16): in-process
    tests compare with fp32 references, so they run as on a chip without it, whatever the CI machine has.
    Session-wide, so module fixtures that run infer.py see it too. Subprocess runs pass --precision fp32 where
    they compare values; tests of auto patch native_bf16 themselves."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("unet.device.native_bf16", lambda device_type, info=None: False)
        yield


@pytest.fixture(autouse=True, scope="session")
def _channels_last_training():
    """train.py's --memory-format auto times a step in each layout on the CPU and keeps the faster: in-process
    tests would then train in whichever layout the machine's noise favoured, so they train as the measurement
    that always favours channels_last (the layout before the probe) says. tests/test_layout.py tests the probe."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("unet.training.layout.measure_layouts",
                   lambda model, dev, shape: {"channels_last": 1.0, "contiguous": 2.0})
        yield


@pytest.fixture(autouse=True, scope="session")
def _fewest_flop_tile_plans():
    """infer.py's --tile-plan speed times candidate plans and keeps the fastest, and a 'same' model's output depends
    on the plan: on a busy machine in-process tests would compare the plan the noise favoured with references tiled
    by the fewest-FLOP plan. So they get the fewest-FLOP plan (what the probe picks when it finds no clearly
    faster one); tests/test_plan_speed.py puts the timed choice back and tests it."""
    from unet.prediction.plan_speed import PlanChoice
    from unet.prediction.tiling import slice_plan, tile_batch_size

    def fewest_flops(height, width, geometry, options, *args, **kwargs):
        plan = slice_plan(height, width, geometry, options)
        return PlanChoice(plan, tile_batch_size(plan, geometry, options))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("unet.prediction.pipeline.fastest_plan", fewest_flops)
        yield


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    convolutions run fastest single-threaded, and the CI machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def volume_reads(monkeypatch) -> list:
    """The ``(z, y, x)`` of every ``Volume.read`` during the test, in order (the reads themselves stay real)."""
    from unet.io import volumes
    reads, real_read = [], volumes.Volume.read

    def read(self, z=slice(None), y=slice(None), x=slice(None)):
        reads.append((z, y, x))
        return real_read(self, z, y, x)

    monkeypatch.setattr(volumes.Volume, "read", read)
    return reads


@pytest.fixture(scope="session")
def isbi_dir() -> Path:
    """The directory with train-volume.tif / train-labels.tif; skips when ISBI_DIR is not set."""
    d = os.environ.get("ISBI_DIR")
    if not d:
        pytest.skip("ISBI_DIR is not set (CI sets it to ../shared/isbi2012)")
    d = Path(d)
    if not (d / "train-volume.tif").is_file():
        pytest.fail(f"ISBI_DIR={d} has no train-volume.tif")
    return d
