import pytest
import torch

from unet.checkpoint import load_checkpoint, load_model, model_from_checkpoint, save_checkpoint
from unet.errors import UserError
from unet.model import UNet


@pytest.fixture
def model():
    return UNet(base_filters=4, depth=3, padding="same", mean=0.3, std=0.2)


def test_round_trip_keeps_weights_config_and_extra_state(tmp_path, model):
    path = tmp_path / "ckpt.pt"
    opt = torch.optim.Adam(model.parameters())
    model(torch.rand(1, 1, 16, 16)).sum().backward()
    opt.step()
    rng = torch.get_rng_state()
    save_checkpoint(path, model, step=7, optimizer=opt.state_dict(), rng=rng,
                    args={"lr": 1e-4, "fold": None})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    loaded, ckpt = load_model(path)
    assert loaded.config == model.config and not loaded.training
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert ckpt["step"] == 7 and ckpt["args"] == {"lr": 1e-4, "fold": None}
    opt2 = torch.optim.Adam(loaded.parameters())
    opt2.load_state_dict(ckpt["optimizer"])
    assert torch.equal(ckpt["rng"], rng)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"checkpoint .*nope.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(tmp_path, model):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"ckpt.pt is not a readable PyTorch checkpoint \(truncated or corrupt\?\)"):
        load_checkpoint(path)


def test_not_a_checkpoint_at_all(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(UserError, match="is not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_foreign_checkpoint(tmp_path, model):
    path = tmp_path / "foreign.pt"
    torch.save(model.state_dict(), path)  # a bare state dict, as other UNet projects write
    with pytest.raises(UserError, match="is not a unet-em checkpoint"):
        load_checkpoint(path)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran on load",))


def test_unsafe_pickle_is_refused_not_executed(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "unet-em-checkpoint", "obj": _RunsCode()}, path)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} was refused: it holds objects other than tensors and plain data "
                              f"(print), and loading it could run code")
    assert "weights_only" not in message and "truncated" not in message and "\n" not in message
    assert "this ran on load" not in capsys.readouterr().out


def test_non_finite_weights_refused_at_load(tmp_path, model):
    path = tmp_path / "nan.pt"
    with torch.no_grad():
        name = [n for n, _ in model.named_parameters()][3]
        dict(model.named_parameters())[name][0].fill_(float("nan"))
    save_checkpoint(path, model)
    with pytest.raises(UserError, match=rf"checkpoint .*nan.pt: weight '{name}' has \d+ non-finite value\(s\) "
                                        rf"\(NaN or Inf\)"):
        load_model(path)


def _old_and_new(tmp_path, model):
    path = tmp_path / "last.pt"
    save_checkpoint(path, model, step=1)
    return path, path.read_bytes()


def test_write_failing_halfway_leaves_old_checkpoint_byte_identical(tmp_path, model, monkeypatch):
    # torch.save writing straight into last.pt (not through the temporary) fails this test.
    path, before = _old_and_new(tmp_path, model)
    real_save = torch.save

    def save_then_fail(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # every byte of the new checkpoint is written ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up before the rename

    monkeypatch.setattr(torch, "save", save_then_fail)
    with torch.no_grad():
        next(model.parameters()).add_(1)
    with pytest.raises(UserError, match=rf"^cannot write {path}: No space left on device; the disk is full"):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_weights_for_another_architecture(tmp_path, model):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["base_filters"] = 8
    with pytest.raises(UserError, match=r"holds weights for another architecture than its config \(shape mismatch"):
        model_from_checkpoint(ckpt, path)
    ckpt["model_config"]["padding"] = "mirror"
    with pytest.raises(UserError, match="has an invalid model config: padding must be one of"):
        model_from_checkpoint(ckpt, path)


def test_write_into_missing_folder(tmp_path, model):
    with pytest.raises(UserError, match="does not exist"):
        save_checkpoint(tmp_path / "no" / "ckpt.pt", model)
