"""--init-from another UNet's bioimage.io package (issue 21, acceptance point 3).

The foreign network is defined here: the geometry of a tiny unet-em model (4 base filters, depth 3, 'same'
convolutions, 3x3 stride-2 transposed convolutions) under milesial/Pytorch-UNet's module names (``inc``,
``downN.maxpool_conv.1.double_conv``, ``upN.up``, ``upN.conv.double_conv``, ``outc.conv``), computing what ours
computes so that a correct load gives the same output. Its packages are written on the fly with bioimageio.spec's
own description classes and ``save_bioimageio_package``: nothing is downloaded or committed.
"""
from __future__ import annotations

import hashlib
import importlib.util
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from unet.data.labels import LabelOptions
from unet.errors import UserError
from unet.model import UNet
from unet.training import init_package
from unet.training.init_from import apply_init, read_init


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(not _installed("bioimageio.spec"), reason="the [bioimageio] extra is not installed "
                                                                          "(pip install -e .[bioimageio])")
SIZE = 32


# ------------------------------------------------------------------------------------------ the foreign UNet

def _double_conv(cin: int, cout: int, batch_norm: bool) -> nn.Sequential:
    layers = []
    for i, o in ((cin, cout), (cout, cout)):
        layers += [nn.Conv2d(i, o, 3, padding=1, bias=not batch_norm)]
        layers += [nn.BatchNorm2d(o)] if batch_norm else []
        layers += [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class DoubleConv(nn.Module):
    def __init__(self, cin, cout, batch_norm):
        super().__init__()
        self.double_conv = _double_conv(cin, cout, batch_norm)

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, cin, cout, batch_norm):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cout, batch_norm))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    """milesial's Up (``up`` declared before ``conv``) with unet-em's upsampling: 3x3 transposed conv + ReLU."""

    def __init__(self, cin, cout, batch_norm, kernel=3):
        super().__init__()
        self.up = (nn.ConvTranspose2d(cin, cin // 2, 3, stride=2, padding=1, output_padding=1) if kernel == 3
                   else nn.ConvTranspose2d(cin, cin // 2, 2, stride=2))
        self.conv = DoubleConv(cin, cout, batch_norm)

    def forward(self, x, skip):
        return self.conv(torch.cat([torch.relu(self.up(x)), skip], dim=1))  # upsampled first, as unet-em


class ForeignUNet(nn.Module):
    """Logits of an unnormalised input; ``ForeignUNet(x)`` = unet-em's ``UNet(x * std + mean)``."""

    def __init__(self, base=4, depth=3, classes=2, batch_norm=False, kernel=3):
        super().__init__()
        f = [base * 2 ** i for i in range(depth)]
        self.inc = DoubleConv(1, f[0], batch_norm)
        for i in range(1, depth):
            self.add_module(f"down{i}", Down(f[i - 1], f[i], batch_norm))
        for i in range(1, depth):
            self.add_module(f"up{i}", Up(f[depth - i], f[depth - i - 1], batch_norm, kernel))
        self.outc = nn.Sequential()
        self.outc.add_module("conv", nn.Conv2d(f[0], classes, 1))
        self.depth = depth

    def forward(self, x):
        skips = [self.inc(x)]
        for i in range(1, self.depth):
            skips.append(getattr(self, f"down{i}")(skips[-1]))
        x = skips.pop()
        for i in range(1, self.depth):
            x = getattr(self, f"up{i}")(x, skips.pop())
        return self.outc(x)


def _foreign(seed=0, **kw) -> ForeignUNet:
    torch.manual_seed(seed)
    net = ForeignUNet(**kw).eval()
    for m in net.modules():  # non-trivial statistics, so that every BatchNorm buffer is checked too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(7)
    return net


# ------------------------------------------------------------------------------------------ packages

def write_package(folder: Path, net: nn.Module, formats=("pytorch_state_dict",), spec="0.5") -> Path:
    """A bioimage.io model package (zip) of ``net`` with the weight ``formats`` asked for; validated by the spec."""
    from bioimageio.spec import ValidationContext, save_bioimageio_package
    from bioimageio.spec.model import v0_5 as s
    folder.mkdir(parents=True, exist_ok=True)
    x = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        y = net(x)
    np.save(folder / "test_input.npy", x.numpy())
    np.save(folder / "test_output.npy", y.numpy())
    (folder / "README.md").write_text("a foreign UNet for tests\n")
    version = s.Version(torch.__version__.split("+")[0])
    weights = {}
    if "pytorch_state_dict" in formats:
        torch.save(net.state_dict(), folder / "weights.pt")
        (folder / "foreign_unet.py").write_text(Path(__file__).read_text())  # never imported by --init-from
        weights["pytorch_state_dict"] = s.PytorchStateDictWeightsDescr(
            source=folder / "weights.pt", sha256=_sha(folder / "weights.pt"), pytorch_version=version,
            architecture=s.ArchitectureFromFileDescr(source=folder / "foreign_unet.py",
                                                     sha256=_sha(folder / "foreign_unet.py"),
                                                     callable=s.Identifier("ForeignUNet"), kwargs={}))
    first = next(iter(weights), None)
    if "torchscript" in formats:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(net, x).save(str(folder / "weights_torchscript.pt"))
        weights["torchscript"] = s.TorchscriptWeightsDescr(
            source=folder / "weights_torchscript.pt", sha256=_sha(folder / "weights_torchscript.pt"),
            pytorch_version=version, **({"parent": first} if first else {}))
        first = first or "torchscript"
    if "onnx" in formats:
        torch.onnx.export(net, (x,), str(folder / "weights.onnx"), dynamo=False, opset_version=17)
        weights["onnx"] = s.OnnxWeightsDescr(source=folder / "weights.onnx", sha256=_sha(folder / "weights.onnx"),
                                             opset_version=17, **({"parent": first} if first else {}))
    axes_in = [s.BatchAxis(), s.ChannelAxis(channel_names=[s.Identifier("raw")]),
               s.SpaceInputAxis(id=s.AxisId("y"), size=SIZE), s.SpaceInputAxis(id=s.AxisId("x"), size=SIZE)]
    axes_out = [s.BatchAxis(), s.ChannelAxis(channel_names=[s.Identifier(f"c{i}") for i in range(y.shape[1])]),
                s.SpaceOutputAxis(id=s.AxisId("y"), size=SIZE), s.SpaceOutputAxis(id=s.AxisId("x"), size=SIZE)]
    with ValidationContext(perform_io_checks=False):
        descr = s.ModelDescr(
            name="foreign unet", description="a milesial-style UNet for tests",
            authors=[s.Author(name="Test")], license="MIT", cite=[s.CiteEntry(text="test", url="https://example.com")],
            documentation=s.FileDescr(source=folder / "README.md"),
            inputs=[s.InputTensorDescr(id=s.TensorId("raw"), axes=axes_in,
                                       test_tensor=s.FileDescr(source=folder / "test_input.npy"))],
            outputs=[s.OutputTensorDescr(id=s.TensorId("logits"), axes=axes_out,
                                         test_tensor=s.FileDescr(source=folder / "test_output.npy"))],
            weights=s.WeightsDescr(**weights))
    path = folder.with_suffix(".zip")
    save_bioimageio_package(descr, output_path=path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ours(seed=9, **kw) -> UNet:
    torch.manual_seed(seed)
    return UNet(**{"base_filters": 4, "depth": 3, "padding": "same", **kw})


def _same_output(model: UNet, net: nn.Module) -> bool:
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        # unet-em normalises inside the model: feed it what, normalised, is the foreign input
        return torch.allclose(model.eval()(x * model.config.std + model.config.mean), net.eval()(x), atol=1e-5)


# ------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("batch_norm", [False, True])
def test_foreign_package_is_matched_by_order_bit_identically(tmp_path, batch_norm):
    net = _foreign(seed=1, batch_norm=batch_norm)
    package = write_package(tmp_path / "pkg", net)
    model = _ours(batch_norm=batch_norm)
    record, line = apply_init(model, read_init(str(package)), LabelOptions())
    theirs = list(net.state_dict().values())
    assert len(theirs) == len(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), theirs))
    assert _same_output(model, net)
    assert record == {"path": str(package), "kind": "bioimageio", "sha256": _sha(tmp_path / "pkg" / "weights.pt"),
                      "fresh_head": False, "matched": "order", "weights": "pytorch_state_dict"}
    assert line.startswith(f"init: {len(theirs)} of {len(theirs)} tensors from bioimageio (pytorch_state_dict "
                           f"weights) {package}")
    assert line.endswith(f"matched by order: {len(theirs)} tensors, first inc.double_conv.0.weight -> "
                         f"downs.0.conv.0.weight")


def test_torchscript_only_package_and_its_folder_and_rdf_yaml(tmp_path):
    net = _foreign(seed=2)
    package = write_package(tmp_path / "pkg", net, formats=("torchscript",))
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(package) as z:
        z.extractall(unpacked)
    for path in (package, unpacked, unpacked / "rdf.yaml"):
        model = _ours()
        record, line = apply_init(model, read_init(str(path)), LabelOptions())
        assert record["weights"] == "torchscript" and record["matched"] == "order"
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net.state_dict().values()))
        assert "(torchscript weights)" in line


def test_new_class_count_gets_a_fresh_head_from_a_foreign_package(tmp_path):
    net = _foreign(seed=3, classes=3)
    package = write_package(tmp_path / "pkg", net, formats=("pytorch_state_dict", "onnx"))
    model = _ours()
    head = model.out.head.weight.detach().clone()
    with pytest.raises(UserError, match=r"pkg.zip predicts 3 classes but this run 2; pass --num-classes 2"):
        apply_init(_ours(), read_init(str(package)), LabelOptions())
    record, line = apply_init(model, read_init(str(package)), LabelOptions(label_kind="classes", num_classes=2))
    assert record["fresh_head"] and line.endswith("; fresh output layer for 2 classes (it predicted 3)")
    assert torch.equal(model.out.head.weight, head)
    kept = list(net.state_dict().values())[:-2]
    assert all(torch.equal(a, b) for a, b in zip(list(model.state_dict().values())[:-2], kept))


@pytest.mark.parametrize("other, position, there, here", [
    ({"base": 8}, 1, "inc.double_conv.0.weight (8, 1, 3, 3) of its 26", "downs.0.conv.0.weight (4, 1, 3, 3)"),
    # position 2 agrees by shape alone (a BatchNorm weight there, a bias here: both (4,))
    ({"batch_norm": True}, 3, "inc.double_conv.1.bias (4,) of its 66", "downs.0.conv.2.weight (4, 4, 3, 3)"),
    ({"depth": 4}, 13, "down3.maxpool_conv.1.double_conv.0.weight (32, 16, 3, 3) of its 36",
     "bottleneck.up.0.weight (16, 8, 3, 3)"),
    ({"kernel": 2}, 13, "up1.up.weight (16, 8, 2, 2) of its 26", "bottleneck.up.0.weight (16, 8, 3, 3)"),
])
def test_another_geometry_is_refused_naming_the_first_position(tmp_path, other, position, there, here):
    package = write_package(tmp_path / "pkg", _foreign(**other))
    with pytest.raises(UserError) as e:
        apply_init(_ours(), read_init(str(package)), LabelOptions())
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--init-from {package}: another architecture")
    assert f"first difference at tensor {position}: {there} vs {here} of this run's 26" in message
    assert message.endswith("pass the --base-filters, --depth, --padding and --batch-norm that give its geometry")
    assert ("upsampling, a 3x3 stride-2 transposed convolution" in message) == (".up.0." in here)


def test_package_without_pytorch_weights_is_refused_in_one_line(tmp_path):
    package = write_package(tmp_path / "pkg", _foreign(), formats=("onnx",))
    with pytest.raises(UserError) as e:
        read_init(str(package))
    assert str(e.value) == (f"--init-from {package}: the package has onnx weights, none of pytorch_state_dict or "
                            f"torchscript; only those two hold tensors that can be loaded here")


def test_weights_that_differ_from_the_declared_sha256_are_refused(tmp_path):
    write_package(tmp_path / "pkg", _foreign())
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(tmp_path / "pkg.zip") as z:
        z.extractall(folder)
    torch.save(_foreign(seed=5).state_dict(), folder / "weights.pt")
    with pytest.raises(UserError, match="the pytorch_state_dict weights file does not match the SHA-256"):
        read_init(str(folder))


def test_export_py_package_is_matched_by_name_through_the_spec(tmp_path):
    """export.py's own package (state dict named ``unet.<ours>``): loaded by name, as before."""
    from unet.checkpoint import save_checkpoint
    from unet.export.bioimageio import PackageOptions, build_package
    source = _ours(seed=4)
    save_checkpoint(tmp_path / "a.pt", source, args={})
    package = build_package(tmp_path / "a.pt", tmp_path / "own.zip", PackageOptions(
        authors=["Test"], license="MIT", weight_formats=("pytorch_state_dict",), test=False))
    model = _ours(seed=5)
    record, line = apply_init(model, read_init(str(package)), LabelOptions())
    assert record["matched"] == "name" and line.endswith("matched by name")
    assert record["weights"] == "pytorch_state_dict"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_without_the_extra_only_export_py_packages_are_read(tmp_path, monkeypatch):
    package = write_package(tmp_path / "pkg", _foreign())  # holds a weights.pt, but not export.py's
    monkeypatch.setattr(init_package, "have_spec", lambda: False)
    with pytest.raises(UserError, match=r"its weights.pt is not export.py's .* needs bioimageio.spec: pip install"):
        read_init(str(package))


def write_package_v0_4(folder: Path, net: nn.Module) -> Path:
    """A model spec 0.4 package folder (torchscript weights), its rdf.yaml written as 0.4 tools wrote it."""
    folder.mkdir(parents=True, exist_ok=True)
    x = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        np.save(folder / "test_input.npy", x.numpy())
        np.save(folder / "test_output.npy", net(x).numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(net, x).save(str(folder / "weights_torchscript.pt"))
    (folder / "README.md").write_text("a foreign UNet for tests\n")
    (folder / "rdf.yaml").write_text(f"""format_version: 0.4.10
type: model
name: foreign unet
description: a milesial-style UNet for tests
authors: [{{name: Test}}]
cite: [{{text: test, url: "https://example.com"}}]
license: MIT
documentation: README.md
timestamp: "2024-01-01T00:00:00"
test_inputs: [test_input.npy]
test_outputs: [test_output.npy]
inputs: [{{name: raw, axes: bcyx, data_type: float32, shape: [1, 1, {SIZE}, {SIZE}]}}]
outputs: [{{name: logits, axes: bcyx, data_type: float32, shape: [1, 2, {SIZE}, {SIZE}]}}]
weights:
  torchscript: {{source: weights_torchscript.pt, sha256: {_sha(folder / "weights_torchscript.pt")}}}
""")
    return folder


def test_model_spec_0_4_package(tmp_path):
    from bioimageio.spec import load_description
    from bioimageio.spec.model import v0_4
    net = _foreign(seed=6)
    folder = write_package_v0_4(tmp_path / "old", net)
    assert isinstance(load_description(folder / "rdf.yaml", perform_io_checks=True), v0_4.ModelDescr)
    model = _ours()
    record, _ = apply_init(model, read_init(str(folder)), LabelOptions())
    assert record["matched"] == "order" and record["weights"] == "torchscript"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net.state_dict().values()))


def test_train_py_fine_tunes_from_a_foreign_package_and_records_it(tmp_path, capsys):
    from unet.checkpoint import load_checkpoint
    from unet.cli import train as cli_train
    package = write_package(tmp_path / "pkg", _foreign(seed=7))
    args = cli_train.get_args_parser().parse_args([
        "--base-filters", "4", "--depth", "3", "--padding", "same", "--input-size", "32", "--batch-size", "2",
        "--workers", "0", "--no-progress", "--max-steps", "1", "--init-from", str(package),
        "--model-dir", str(tmp_path / "run")])
    cli_train.main(args)
    assert f"(pytorch_state_dict weights) {package}" in capsys.readouterr().out
    init = load_checkpoint(tmp_path / "run" / "last.pt")["init"]
    assert init == {"path": str(package), "kind": "bioimageio", "sha256": _sha(tmp_path / "pkg" / "weights.pt"),
                    "fresh_head": False, "matched": "order", "weights": "pytorch_state_dict"}


def test_a_folder_without_a_description_or_a_zip_without_one_is_refused_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: the folder holds no rdf.yaml or bioimageio.yaml or model.yaml; "
                                        r"give a bioimage.io package"):
        read_init(str(tmp_path / "empty"))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("notes.txt", "no package")
    with pytest.raises(UserError, match=r"other.zip: not a bioimage.io package bioimageio.spec can open \(No rdf.yaml"):
        read_init(str(tmp_path / "other.zip"))
