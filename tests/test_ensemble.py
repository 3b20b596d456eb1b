"""Ensembles: the mean of the members' probabilities, through infer.py --ckpt a.pt b.pt, TTA included."""
import numpy as np
import pytest
import tifffile
import torch

from unet.checkpoint import save_checkpoint
from unet.commands import infer
from unet.device import setup_device
from unet.ensemble import Ensemble, load_ensemble
from unet.model import UNet
from unet.predict import predict_probabilities
from unet.tiling import TilingOptions


def _model(seed: int, **kw) -> UNet:
    torch.manual_seed(seed)
    return UNet(base_filters=2, depth=2, padding=kw.pop("padding", "same"), **kw).eval()


def test_softmax_of_the_ensemble_is_the_mean_probability():
    models = [_model(s) for s in (0, 1, 2)]
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        got = Ensemble(models)(x).softmax(1)
        mean = torch.stack([m(x).softmax(1) for m in models]).mean(0)
    torch.testing.assert_close(got, mean, rtol=0, atol=1e-6)


def test_ensemble_has_the_geometry_of_its_first_member():
    models = [_model(0, padding="valid"), _model(1, padding="valid")]
    ens = Ensemble(models)
    assert ens.config is models[0].config and ens.padding == "valid" and ens.edge_band == models[0].edge_band
    assert ens.output_size(28) == models[0].output_size(28)
    assert ens.valid_input_size(30) == models[0].valid_input_size(30)
    assert ens.input_size_for_output(10) == models[0].input_size_for_output(10)


@pytest.mark.parametrize("tta", [False, True])
def test_infer_with_two_checkpoints_writes_the_mean_probability(tmp_path, tta):
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    models = [_model(0), _model(5)]
    for path, model in zip(paths, models):
        save_checkpoint(path, model)
    stack = np.random.default_rng(0).random((3, 40, 52), dtype=np.float32)
    tifffile.imwrite(tmp_path / "in.tif", stack, photometric="minisblack")
    argv = ["--ckpt", *map(str, paths), "--input", str(tmp_path / "in.tif"), "--output", str(tmp_path / "m.tif"),
            "--probabilities", str(tmp_path / "p.tif"), "--tile-size", "32", "--device", "cpu", "--no-progress"]
    assert infer(argv + (["--tta"] if tta else [])) == 0
    dev = setup_device("cpu")
    options = TilingOptions(tile_size=32, tta=tta)
    expected = np.stack([np.mean([predict_probabilities(dev.prepare_model(m), s[None], dev, options)[1].numpy()
                                  for m in models], axis=0) for s in stack])
    np.testing.assert_allclose(tifffile.imread(tmp_path / "p.tif"), expected, rtol=0, atol=1e-6)


def test_checkpoints_of_another_geometry_are_refused_naming_both(tmp_path, capsys):
    save_checkpoint(tmp_path / "a.pt", _model(0))
    save_checkpoint(tmp_path / "b.pt", _model(1, padding="valid"))
    with pytest.raises(SystemExit) as e:
        infer(["--ckpt", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--output", str(tmp_path / "m.tif"),
               "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.pt: padding is 'valid' but" in err[0] and "a.pt has 'same'" in err[0], err
    assert not (tmp_path / "m.tif").exists()


def test_load_ensemble_returns_every_checkpoint(tmp_path):
    for name, seed in (("a.pt", 0), ("b.pt", 1)):
        save_checkpoint(tmp_path / name, _model(seed))
    ens, ckpts = load_ensemble([tmp_path / "a.pt", tmp_path / "b.pt"])
    assert isinstance(ens, Ensemble) and len(ens.members) == 2 and len(ckpts) == 2 and not ens.training
