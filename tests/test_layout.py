"""train.py's memory layout (unet.training.layout): the choice rules, a probe that leaves the model and the random
stream as they were, and a run that records its layout and keeps it on resume."""
import torch

from unet.cli import train as cli_train
from unet.checkpoint import load_checkpoint
from unet.device import DeviceSetup
from unet.model import UNet
from unet.training import layout
from unet.training.layout import choose_layout, step_seconds

MEASURE_LAYOUTS = layout.measure_layouts  # conftest patches the module's name for every other test
CPU = DeviceSetup(torch.device("cpu"), memory_format=torch.channels_last)
SHAPE = (2, 1, 32, 32)


def never(*args):
    raise AssertionError("nothing should be measured")


def test_asked_and_recorded_layouts_win_and_only_the_cpu_is_measured():
    model = UNet(base_filters=4, depth=2, padding="same")
    assert choose_layout("contiguous", "channels_last", model, CPU, SHAPE, measure=never) == ("contiguous", None)
    assert choose_layout("auto", "contiguous", model, CPU, SHAPE, measure=never) == ("contiguous", None)
    npu_like = DeviceSetup(torch.device("meta"), memory_format=torch.contiguous_format)
    assert choose_layout("auto", None, model, npu_like, SHAPE, measure=never) == ("contiguous", None)


def test_auto_on_the_cpu_keeps_the_faster_layout_and_says_so():
    model = UNet(base_filters=4, depth=2, padding="same")
    name, line = choose_layout("auto", None, model, CPU, SHAPE,
                               measure=lambda m, d, s: {"channels_last": 19.71, "contiguous": 11.02})
    assert name == "contiguous"
    assert line == ("memory layout contiguous: one training step took 11.02 s, 19.71 s in channels_last (measured "
                    "on this CPU; --memory-format pins it)")


def test_the_probe_times_both_layouts_and_leaves_weights_statistics_gradients_and_rng_alone():
    torch.manual_seed(0)
    model = UNet(base_filters=4, depth=2, padding="same", batch_norm=True, dropout=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    times = MEASURE_LAYOUTS(model, CPU, SHAPE)
    assert set(times) == {"channels_last", "contiguous"} and all(t > 0 for t in times.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm's running statistics too
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's stream untouched


def test_step_seconds_skips_a_short_first_step_and_keeps_the_fastest():
    model = UNet(base_filters=4, depth=2, padding="same")
    # first step 1.5 s (untimed: set-up), then 0.1 s and 0.15 s: 0.25 s timed is enough
    ticks = iter([0.0, 1.5,  10.0, 10.1,  20.0, 20.15,  30.0, 30.01])
    assert abs(step_seconds(model, torch.rand(SHAPE), CPU, clock=lambda: next(ticks)) - 0.1) < 1e-9
    # a first step of 30 s is a measurement in itself
    ticks = iter([0.0, 30.0,  40.0, 40.01])
    assert step_seconds(model, torch.rand(SHAPE), CPU, clock=lambda: next(ticks)) == 30.0


def test_a_run_records_its_layout_and_a_resume_keeps_it(tmp_path):
    tiny = ["--base-filters", "4", "--depth", "3", "--padding", "same", "--input-size", "64", "--batch-size", "2",
            "--workers", "0", "--no-progress", "--no-tensorboard", "--model-dir", str(tmp_path / "run")]
    args = cli_train.get_args_parser().parse_args(tiny + ["--max-steps", "2", "--memory-format", "contiguous"])
    cli_train.main(args)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["args"]["memory_format"] == "contiguous"
    assert all(v.is_contiguous() for v in ckpt["model"].values())
    # auto (conftest's measurement would pick channels_last) resumes in the recorded layout
    cli_train.main(cli_train.get_args_parser().parse_args(tiny + ["--max-steps", "4", "--resume"]))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["args"]["memory_format"] == "contiguous"
