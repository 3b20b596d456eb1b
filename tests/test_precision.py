"""--precision (infer.py, evaluate.py): auto is bf16 autocast where the chip computes bf16 natively, else fp32."""
from types import SimpleNamespace

import pytest

from unet.cli.commands import infer
from unet.device import DeviceOptions, native_bf16, prediction_autocast  # the real native_bf16 (conftest pins
from unet.errors import UserError                                        # unet.device's during the tests)
from unet.training.narration import _emulated

AMX = {"flags": "fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16"}
AVX2 = {"flags": "fpu sse2 avx2 fma"}
ARM = {"Features": "fp asimd sve bf16"}


@pytest.mark.parametrize("info, native", [(AMX, True), (AVX2, False), (ARM, True), ({}, False)])
def test_native_bf16_reads_the_cpu_flags(info, native):
    assert native_bf16("cpu", info) is native


@pytest.mark.parametrize("chip_has_bf16, precision, amp, expected", [
    (True, "auto", False, (True, "bf16")),      # the default on AMX / AVX512_BF16
    (False, "auto", False, (False, None)),      # elsewhere fp32
    (True, "fp32", False, (False, None)),       # the opt-out
    (False, "bf16", False, (True, "bf16")),     # asked for, emulated or not
    (True, "fp16", False, (True, "fp16")),
    (True, "auto", True, (True, None)),         # --amp keeps training's meaning (dtype chosen by the device)
])
def test_prediction_autocast(chip_has_bf16, precision, amp, expected, monkeypatch):
    asked = []
    monkeypatch.setattr("unet.device.native_bf16", lambda device_type, info=None: asked.append(device_type)
                        or chip_has_bf16)
    assert prediction_autocast(precision, DeviceOptions(device="auto", amp=amp), "cpu") == expected
    assert asked == (["cpu"] if precision == "auto" and not amp else [])  # the resolved type, never "auto"


def test_amp_keeps_its_dtype_and_contradicts_an_explicit_precision():
    assert prediction_autocast("auto", DeviceOptions(device="cpu", amp=True, amp_dtype="fp16"), "cpu") == (True, "fp16")
    with pytest.raises(UserError, match="--amp and --precision fp32 both choose the arithmetic; pass one of them"):
        prediction_autocast("fp32", DeviceOptions(device="cpu", amp=True), "cpu")


@pytest.mark.parametrize("chip_has_bf16, argv, said", [(True, [], "bf16"), (False, [], "fp32"),
                                                       (True, ["--precision", "fp32"], "fp32")])
def test_infer_runs_bf16_by_default_on_a_chip_with_native_bf16(chip_has_bf16, argv, said, tmp_path, capsys,
                                                              monkeypatch):
    from unet.checkpoint import save_checkpoint
    from tiny_models import balanced_unet
    monkeypatch.setattr("unet.device.native_bf16", lambda device_type, info=None: chip_has_bf16)
    save_checkpoint(tmp_path / "m.pt", balanced_unet())
    infer(["--ckpt", str(tmp_path / "m.pt"), "--output", str(tmp_path / "m.tif"), "--no-progress", *argv])
    assert f"(cpu, {said})" in capsys.readouterr().err


def test_bf16_probabilities_stay_close_to_fp32():
    # The ISBI figures (docs/benchmarks.md: 0.028 % of mask pixels on a trained model) are not reproducible on
    # a random tiny model, whose probabilities crowd around 0.5 (0.5 % of its mask pixels flip); what holds on any
    # model is that bf16 autocast moves a probability by little (measured here: max 0.026, mean 0.0009).
    import numpy as np
    import torch
    from tiny_models import balanced_unet
    from unet.data.synthetic import make_synthetic_em
    from unet.device import setup_device
    from unet.prediction.predictor import predict_probabilities
    image = torch.from_numpy(make_synthetic_em(1, 256, 256, 5)[0][0].astype(np.float32) / 255)[None]
    model = balanced_unet()
    probs = {}
    for amp in (False, True):
        dev = setup_device("cpu", amp=amp, amp_dtype="bf16" if amp else None)
        probs[amp] = predict_probabilities(dev.prepare_model(model), image, dev)[1]
    diff = (probs[True] - probs[False]).abs()
    assert diff.max() < 0.05 and diff.mean() < 0.002


@pytest.mark.parametrize("device_type, amp, native, warned", [
    ("cpu", "bf16", False, True), ("cpu", "bf16", True, False), ("cpu", "fp32", False, False),
    ("cuda", "bf16", False, False)])
def test_train_warns_when_amp_asks_a_cpu_for_emulated_bf16(device_type, amp, native, warned, monkeypatch):
    monkeypatch.setattr("unet.device.native_bf16", lambda device_type, info=None: native)
    said = _emulated(SimpleNamespace(type=device_type, amp_name=amp))
    assert ("this CPU has no native bf16" in said and "drop --amp for fp32" in said) == warned
    assert said == "" or warned
