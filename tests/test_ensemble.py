"""unet.prediction.ensemble: the mean probability of several UNets, usable wherever a UNet predicts."""
import numpy as np
import pytest
import tifffile
import torch

from unet.checkpoint import save_checkpoint
from unet.cli.commands import infer
from unet.device import setup_device
from unet.prediction.ensemble import Ensemble, load_ensemble
from unet.errors import UserError
from unet.model import UNet
from unet.prediction.predictor import predict_probabilities, tiling_plan
from unet.prediction.tiling import TilingOptions


def unet(seed, **kw):
    torch.manual_seed(seed)
    kw = {"base_filters": 4, "depth": 3, "padding": "same", **kw}
    return UNet(**kw).eval()


def probs(model, x):
    with torch.no_grad():
        return model(x).softmax(1)


def test_ensemble_of_one_is_the_model():
    model, x = unet(0), torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(probs(Ensemble([model]), x), probs(model, x), rtol=0, atol=1e-6)


def test_ensemble_of_two_is_the_mean_probability():
    a, b, x = unet(0), unet(1), torch.rand(2, 1, 32, 32)
    pa, pb = probs(a, x), probs(b, x)
    assert (pa - pb).abs().max() > 1e-3  # two different models, so the mean is a real test
    torch.testing.assert_close(probs(Ensemble([a, b]), x), (pa + pb) / 2, rtol=0, atol=1e-6)


def test_ensemble_predicts_like_a_unet_with_tiles_and_tta():
    """Tiling, blending and TTA are linear in the probabilities: ensemble of predictions = prediction of ensemble."""
    dev = setup_device("cpu")
    a, b = unet(0), unet(1)
    image = torch.rand(1, 50, 70)
    opts = TilingOptions(tile_size=32, tta=True)
    mean = (predict_probabilities(a, image, dev, opts) + predict_probabilities(b, image, dev, opts)) / 2
    ens = Ensemble([a, b])
    torch.testing.assert_close(predict_probabilities(ens, image, dev, opts), mean, rtol=0, atol=1e-6)
    assert tiling_plan(ens, 50, 70, opts) == tiling_plan(a, 50, 70, opts)


def test_ensemble_answers_the_geometry_of_its_first_member():
    a, b = unet(0, padding="valid"), unet(1, padding="valid", base_filters=8)
    ens = Ensemble([a, b])
    assert ens.padding == "valid" and ens.edge_band == a.edge_band
    assert ens.output_size(92) == a.output_size(92) and ens.valid_input_size(90) == a.valid_input_size(90)
    assert ens.input_size_for_output(40) == a.input_size_for_output(40)
    assert ens.config.in_channels == 1 and ens.config.num_classes == 2
    assert ens.config.base_filters == 8  # the widest member sets the memory estimate


def test_load_ensemble(tmp_path):
    for seed in (0, 1):
        save_checkpoint(tmp_path / f"m{seed}.pt", unet(seed), args={})
    one, ckpts = load_ensemble([tmp_path / "m0.pt"])
    assert isinstance(one, UNet) and len(ckpts) == 1
    two, ckpts = load_ensemble([tmp_path / "m0.pt", tmp_path / "m1.pt"])
    assert isinstance(two, Ensemble) and len(ckpts) == 2 and not two.training
    x = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(probs(two, x), (probs(unet(0), x) + probs(unet(1), x)) / 2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("change", [{"padding": "valid"}, {"depth": 4}, {"in_channels": 3}, {"num_classes": 3,
                                    "class_names": ["a", "b", "c"]}])
def test_load_ensemble_refuses_disagreeing_members_naming_both(tmp_path, change):
    save_checkpoint(tmp_path / "a.pt", unet(0), args={})
    save_checkpoint(tmp_path / "b.pt", unet(1, **change), args={})
    key = next(iter(change))
    with pytest.raises(UserError) as e:
        load_ensemble([tmp_path / "a.pt", tmp_path / "b.pt"])
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "a.pt") in message and str(tmp_path / "b.pt") in message
    assert key in message


def _seeded(seed: int, **kw) -> UNet:
    torch.manual_seed(seed)
    return UNet(base_filters=2, depth=2, padding=kw.pop("padding", "same"), **kw).eval()


@pytest.mark.parametrize("tta", [False, True])
def test_infer_with_two_checkpoints_writes_the_mean_probability(tmp_path, tta):
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    models = [_seeded(0), _seeded(5)]
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
    save_checkpoint(tmp_path / "a.pt", _seeded(0))
    save_checkpoint(tmp_path / "b.pt", _seeded(1, padding="valid"))
    with pytest.raises(SystemExit) as e:
        infer(["--ckpt", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--output", str(tmp_path / "m.tif"),
               "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.pt and" in err[0] and "b.pt cannot form an ensemble: padding same vs valid" in err[0], err
    assert not (tmp_path / "m.tif").exists()
