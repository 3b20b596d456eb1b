"""unet.ensemble: the mean probability of several UNets, usable wherever a UNet predicts."""
import pytest
import torch

from unet.checkpoint import save_checkpoint
from unet.device import setup_device
from unet.ensemble import Ensemble, load_ensemble
from unet.errors import UserError
from unet.model import UNet
from unet.predict import predict_probabilities, tiling_plan
from unet.tiling import TilingOptions


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
