"""Fine-tuning (issue 21 item 3): --init-from a checkpoint or a bioimage.io package, shape handling, the fresh
output layer, the refusals, --freeze-encoder-steps and what the checkpoint records."""
import hashlib
import zipfile

import pytest
import torch

from unet.checkpoint import load_checkpoint, save_checkpoint
from unet.cli import train as cli_train
from unet.data.labels import LabelOptions
from unet.errors import UserError
from unet.export.bioimageio_network import package_network
from unet.model import UNet
from unet.training.config import FINE_TUNE_LEARNING_RATE
from unet.training import init_package
from unet.training.init_from import apply_init, encoder_parameters, read_init

TINY = ["--base-filters", "4", "--depth", "3", "--padding", "same", "--input-size", "32", "--batch-size", "2",
        "--workers", "0", "--no-progress", "--log-every", "1"]
ARCH = {"base_filters": 4, "depth": 3, "padding": "same"}


def _unet(seed=0, **kw):
    torch.manual_seed(seed)
    return UNet(**{**ARCH, **kw})


def _ckpt(path, model):
    save_checkpoint(path, model, args={})
    return str(path)


def train(tmp_path, *extra, name="run"):
    args = cli_train.get_args_parser().parse_args(TINY + ["--model-dir", str(tmp_path / name), *extra])
    return cli_train.main(args)


def test_same_architecture_loads_every_weight(tmp_path):
    source = _unet(seed=1)
    model = _unet(seed=2)
    record, line = apply_init(model, read_init(_ckpt(tmp_path / "a.pt", source)), LabelOptions())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    assert not record["fresh_head"] and record["kind"] == "checkpoint"
    assert record["sha256"] == hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    assert line.startswith(f"init: {len(source.state_dict())} of {len(source.state_dict())} tensors from checkpoint")


def test_new_class_count_gets_a_fresh_output_layer_when_num_classes_says_so(tmp_path):
    source = _unet(seed=1)
    model = _unet(seed=2, num_classes=3, class_names=["a", "b", "c"])
    fresh_head = model.out.head.weight.detach().clone()
    record, line = apply_init(model, read_init(_ckpt(tmp_path / "a.pt", source)),
                              LabelOptions(label_kind="classes", num_classes=3))
    assert record["fresh_head"] and line.endswith("fresh output layer for 3 classes (it predicted 2)")
    assert torch.equal(model.out.head.weight, fresh_head)
    kept = [k for k in source.state_dict() if not k.startswith("out.head.")]
    assert all(torch.equal(model.state_dict()[k], source.state_dict()[k]) for k in kept)


def test_class_count_differing_without_num_classes_is_refused(tmp_path):
    source = _unet(seed=1, num_classes=3, class_names=["a", "b", "c"])
    with pytest.raises(UserError, match=r"a.pt predicts 3 classes but this run 2; pass --num-classes 2"):
        apply_init(_unet(), read_init(_ckpt(tmp_path / "a.pt", source)), LabelOptions())


@pytest.mark.parametrize("other, layer", [({"base_filters": 8}, "downs.0."), ({"batch_norm": True}, "downs.0."),
                                          ({"depth": 4}, "")])
def test_another_architecture_is_refused_naming_the_first_mismatched_layer(tmp_path, other, layer):
    source = _unet(**other)
    with pytest.raises(UserError) as e:
        apply_init(_unet(), read_init(_ckpt(tmp_path / "a.pt", source)), LabelOptions())
    message = str(e.value)
    assert "another architecture than this run's (layer " + layer in message and "--base-filters" in message


def test_bioimageio_package_zip_and_folder_load_the_unet_weights_without_the_extra(tmp_path, monkeypatch):
    """Without bioimageio.spec, export.py's weights.pt is read directly (tests/test_init_from_packages.py: with it)."""
    monkeypatch.setattr(init_package, "have_spec", lambda: False)
    source = _unet(seed=3)
    folder = tmp_path / "pkg"
    folder.mkdir()
    torch.save(package_network(source).state_dict(), folder / "weights.pt")
    (folder / "rdf.yaml").write_text("format_version: 0.5.3\n")
    with zipfile.ZipFile(tmp_path / "pkg.zip", "w") as z:
        for f in folder.iterdir():
            z.write(f, f.name)
    for path in (folder, tmp_path / "pkg.zip"):
        init = read_init(str(path))
        assert init.kind == "bioimageio"
        model = _unet(seed=4)
        apply_init(model, init, LabelOptions())
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    with pytest.raises(UserError, match="needs bioimageio.spec"):
        read_init(str(tmp_path))


def test_fine_tuning_run_records_its_start_freezes_the_encoder_and_lowers_the_rate(tmp_path, capsys):
    train(tmp_path, "--max-steps", "2", name="base")
    base = tmp_path / "base" / "last.pt"
    train(tmp_path, "--init-from", str(base), "--freeze-encoder-steps", "-1", "--max-steps", "2")
    assert "init: " in capsys.readouterr().out
    before, after = load_checkpoint(base), load_checkpoint(tmp_path / "run" / "last.pt")
    assert after["init"] == {"path": str(base), "kind": "checkpoint", "fresh_head": False, "matched": "name",
                             "sha256": hashlib.sha256(base.read_bytes()).hexdigest()}
    assert after["args"]["init_from"] == str(base) and after["args"]["learning_rate"] == FINE_TUNE_LEARNING_RATE
    model = UNet(**ARCH)
    encoder = {id(p) for p in encoder_parameters(model)}
    names = [n for n, p in model.named_parameters() if id(p) in encoder]
    assert names and all(torch.equal(before["model"][n], after["model"][n]) for n in names)
    assert not torch.equal(before["model"]["out.head.weight"], after["model"]["out.head.weight"])


def test_fine_tuning_refusals_write_nothing(tmp_path):
    _ckpt(tmp_path / "wide.pt", _unet(base_filters=8))
    with pytest.raises(UserError, match="another architecture than this run's"):
        train(tmp_path, "--init-from", str(tmp_path / "wide.pt"), "--max-steps", "1")
    with pytest.raises(UserError, match="--freeze-encoder-steps needs --init-from"):
        train(tmp_path, "--freeze-encoder-steps", "5", "--max-steps", "1")
    with pytest.raises(UserError, match="no such file or folder"):
        train(tmp_path, "--init-from", str(tmp_path / "nope.pt"), "--max-steps", "1")
    assert not (tmp_path / "run").exists()


def test_a_fine_tuning_run_with_a_freeze_resumes_bit_identically(tmp_path):
    train(tmp_path, "--max-steps", "2", name="base")
    common = ("--init-from", str(tmp_path / "base" / "last.pt"), "--freeze-encoder-steps", "2", "--save-every", "2")
    train(tmp_path, *common, "--max-steps", "4", name="straight")
    args = cli_train.get_args_parser().parse_args(TINY + ["--model-dir", str(tmp_path / "split"), *common,
                                                          "--max-steps", "4"])
    args.max_steps = 2
    cli_train.main(args)
    train(tmp_path, *common, "--max-steps", "4", "--resume", name="split")
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("straight", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["init"] == a["init"] and len(b["optimizer"]["param_groups"]) == 2
