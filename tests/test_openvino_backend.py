"""infer.py --backend openvino: OpenVINO runs the forward pass; masks as torch's, bad combinations refused."""
import numpy as np
import pytest
import tifffile
import torch

from tiny_models import balanced_unet
from unet.checkpoint import save_checkpoint
from unet.cli.commands import infer
from unet.device import setup_device
from unet.errors import UserError
from unet.prediction.pipeline import StackPredictor
from unet.prediction.tiling import TilingOptions

openvino = pytest.importorskip("openvino")  # installed by the test extra (setup.py: .[openvino])

from unet.prediction.openvino_forward import openvino_forward  # noqa: E402


def _masks(model, forward, stack, options):
    got = {}
    StackPredictor(model, setup_device("cpu"), options, forward=forward).run(
        [stack], lambda k, image, mask, prob: got.update({k: (mask.copy(), prob.copy())}), keep_probabilities=True)
    return [got[k] for k in range(len(stack))]


@pytest.mark.parametrize("padding, tile", [("same", 64), ("valid", 76)])
def test_fp32_openvino_gives_torchs_probabilities(padding, tile):
    model = balanced_unet(padding)
    stack = np.random.default_rng(1).integers(0, 255, (3, 90, 110), dtype=np.uint8)
    options = TilingOptions(tile_size=tile, tile_batch=2)
    ours = _masks(model, None, stack, options)
    theirs = _masks(model, openvino_forward(model, "fp32", torch.get_num_threads()), stack, options)
    for (mask_t, prob_t), (mask_o, prob_o) in zip(ours, theirs):
        np.testing.assert_allclose(prob_o, prob_t, atol=1e-4)
        assert (mask_o != mask_t).mean() <= 0.001  # only pixels at p = 0.5 +- 1e-4 may flip
        assert 0.2 < (mask_t > 0).mean() < 0.8  # both classes present: the comparison means something


def test_openvino_forward_converts_once_per_shape_and_refuses_fp16():
    model = balanced_unet("same")
    forward = openvino_forward(model, "fp32", 1)
    a = forward(torch.rand(2, 1, 32, 32))
    b = forward(torch.rand(2, 1, 32, 32))
    c = forward(torch.rand(1, 1, 64, 64))
    assert a.shape == b.shape == (2, 2, 32, 32) and c.shape == (1, 2, 64, 64) and a.dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        openvino_forward(model, "fp16", 1)


def test_infer_cli_with_openvino_writes_the_torch_masks(tmp_path, capsys):
    save_checkpoint(tmp_path / "m.pt", balanced_unet())
    for backend in ("torch", "openvino"):
        infer(["--ckpt", str(tmp_path / "m.pt"), "--output", str(tmp_path / f"{backend}.tif"), "--no-progress",
               "--precision", "fp32", "--backend", backend])
    assert f"openvino {openvino.__version__}" in capsys.readouterr().err
    torch_masks, ov_masks = tifffile.imread(tmp_path / "torch.tif"), tifffile.imread(tmp_path / "openvino.tif")
    assert torch_masks.shape == ov_masks.shape and (torch_masks != ov_masks).mean() <= 0.001


@pytest.mark.parametrize("extra, message", [
    (["--compile"], "--compile is torch's compiler and --backend openvino compiles the model itself: drop one"),
])
def test_bad_combinations_are_refused_in_one_line(extra, message, tmp_path, capsys):
    save_checkpoint(tmp_path / "m.pt", balanced_unet())
    with pytest.raises(SystemExit) as exit_:
        infer(["--ckpt", str(tmp_path / "m.pt"), "--output", str(tmp_path / "o.tif"), "--backend", "openvino",
               *extra])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"infer.py: error: {message}\n"
    assert list(tmp_path.iterdir()) == [tmp_path / "m.pt"]  # nothing written


def test_missing_openvino_is_said_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("unet.cli.infer.openvino_version", lambda: None)
    save_checkpoint(tmp_path / "m.pt", balanced_unet())
    with pytest.raises(SystemExit):
        infer(["--ckpt", str(tmp_path / "m.pt"), "--output", str(tmp_path / "o.tif"), "--backend", "openvino"])
    assert capsys.readouterr().err == ("infer.py: error: --backend openvino needs OpenVINO, which is not installed: "
                                       "pip install openvino\n")


def test_a_device_other_than_the_cpu_is_refused():
    from unet.cli.infer import _forward
    from unet.device import DeviceSetup
    from unet.prediction.stacks import InferOptions
    with pytest.raises(UserError, match="--backend openvino runs on the CPU, and this run's device is cuda"):
        _forward(balanced_unet(), DeviceSetup(torch.device("cuda", 0)), InferOptions(backend="openvino"))
