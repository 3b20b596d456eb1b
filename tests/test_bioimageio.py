"""BioImage Model Zoo packages (unet/export/bioimageio.py, bioimageio_network.py, export.py).

The geometry and network tests need only torch; the package tests need the ``[bioimageio]`` extra
(bioimageio.core, onnxruntime) and are skipped with a note without it. One tiny 'valid' model (4 base
filters, depth 3) is packaged once through export.py's command line, with its own bioimageio.core test on.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from unet.export.bioimageio import DTYPE_GAIN
from unet.export.bioimageio_network import (WEIGHT_FORMATS, BioimageioUNet, architecture_source, package_geometry,
                                            package_network)
from unet.checkpoint import VERSION, save_checkpoint
from unet.cli.commands import export as cli
from unet.io.images import scale_by_dtype
from unet.data.synthetic import make_synthetic_em
from unet.model import UNet

ROOT = Path(__file__).resolve().parents[1]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # the parent package (bioimageio) is missing
        return False


HAVE_EXTRA = all(_installed(m) for m in ("bioimageio.core", "bioimageio.spec", "onnxruntime"))
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason="the [bioimageio] extra is not installed "
                                                        "(pip install -e .[bioimageio])")
# Tiled bioimage.io prediction vs infer.py on a 512x512 slice: measured 1.8e-7 (float rounding) everywhere
# except infer.py's own transposed-convolution edge band (see test_tiled_prediction_matches_infer_py).
TOLERANCE = 1e-5


def _tiny_model(padding: str = "valid") -> UNet:
    torch.manual_seed(0)
    return UNet(base_filters=4, depth=3, padding=padding)


# ------------------------------------------------------------------------------------------ no extra needed

@pytest.mark.parametrize("depth, padding, expected", [
    (5, "valid", dict(margin=92, step=16, crop=12, halo=124, min_size=264)),   # NVIDIA's 572 -> 388 model
    (3, "valid", dict(margin=20, step=4, crop=0, halo=24, min_size=52)),
    (5, "same", dict(margin=0, step=16, crop=0, halo=16, min_size=48)),
])
def test_geometry_from_size_arithmetic(depth, padding, expected):
    model = UNet(base_filters=1, depth=depth, padding=padding)
    geom = package_geometry(model)
    assert geom.__dict__ == expected
    if padding == "valid":
        assert model.output_size(572 if depth == 5 else 44) == (388 if depth == 5 else 4)  # margin 92 / 20
        for n in range(4):  # every declared block is a valid UNet input once the crop is dropped
            block = geom.min_size + n * geom.step
            assert model.output_size(block - geom.crop) == block - geom.crop - 2 * geom.margin
            assert (block - 2 * geom.halo) % geom.step == 0 and (geom.halo - geom.margin) % geom.step == 0
        assert geom.halo >= geom.margin + geom.crop + model.edge_band


def test_packaged_network_is_softmax_of_the_model_at_the_right_place():
    model = _tiny_model().eval()
    net = package_network(model)
    x = torch.rand(2, 1, 60, 60)
    with torch.no_grad():
        expected = model(x).softmax(1)
        got = net(x)
    assert got.shape == (2, 2, 60, 60)
    torch.testing.assert_close(got[..., 20:-20, 20:-20], expected, rtol=0, atol=1e-6)
    assert got[..., :20, :].abs().max() == 0 and got[..., -20:].abs().max() == 0  # the halo, to be cropped


def test_architecture_file_stands_alone():
    """The pytorch_state_dict architecture file needs torch only, not this package."""
    module = types.ModuleType("unet_em_model_standalone")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(compile(architecture_source(), "unet_em_model.py", "exec"), module.__dict__)
        model = _tiny_model().eval()
        net = package_network(model)
        rebuilt = module.BioimageioUNet(config=model.config.to_dict(), margin=net.margin, crop=net.crop).eval()
        rebuilt.load_state_dict(net.state_dict())
        x = torch.rand(1, 1, 56, 56)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), net(x))
        assert "from unet" not in architecture_source()
    finally:
        del sys.modules[module.__name__]


def test_preprocessing_gain_is_scale_by_dtype():
    for dtype, top in (("uint8", 255), ("uint16", 65535)):
        raw = np.array([0, 1, top // 3, top], dtype=dtype)
        np.testing.assert_allclose(raw.astype(np.float32) * np.float32(DTYPE_GAIN[dtype]), scale_by_dtype(raw),
                                   rtol=1e-7, atol=0)
    assert DTYPE_GAIN["float32"] is None


# ------------------------------------------------------------------------------------------ packages

def _checkpoint(path: Path, model: UNet, **extra) -> Path:
    save_checkpoint(path, model, step=7, args={"data_dir": None, "fold": 0, "folds": 5, "fold_scheme": "disjoint",
                                               "max_steps": 7, "batch_size": 2, "learning_rate": 1e-4},
                    metrics={"dice_nvidia": 0.6123, "v_rand": 0.4}, **extra)
    return path


def _export(argv: list[str]) -> int:
    return cli(argv)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    if not HAVE_EXTRA:
        pytest.skip("the [bioimageio] extra is not installed (pip install -e .[bioimageio])")
    folder = tmp_path_factory.mktemp("bioimageio")
    ckpt = _checkpoint(folder / "best.pt", _tiny_model())
    out = folder / "unet.zip"
    # Through the command line, with the package's own bioimageio.core test of every weight format on.
    assert _export(["--ckpt", str(ckpt), "--output", str(out), "--author", "Jane Doe;EM Lab",
                    "--author", "John Roe", "--license", "CC-BY-4.0"]) == 0
    return ckpt, out


@needs_extra
@pytest.mark.slow
def test_bioimageio_test_cli_passes_every_weight_format(package):
    _, out = package
    for fmt in WEIGHT_FORMATS:
        # `bioimageio test PACKAGE.zip` is the bioimageio.core command line (python -m bioimageio.core).
        result = subprocess.run([sys.executable, "-m", "bioimageio.core", "test", str(out),
                                 f"--weight-format={fmt}"], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@needs_extra
def test_package_content(package):
    from bioimageio.spec import load_model_description
    _, out = package
    descr = load_model_description(out, perform_io_checks=False)
    assert descr.validation_summary.status == "valid-format"
    with zipfile.ZipFile(out) as z:
        for fmt in WEIGHT_FORMATS:
            entry = getattr(descr.weights, fmt)
            assert hashlib.sha256(z.read(str(entry.source.path))).hexdigest() == entry.sha256
        readme = z.read("README.md").decode()
        cover = z.read(str(descr.covers[0].source.path))
    raw, = descr.inputs
    assert [a.id for a in raw.axes] == ["batch", "channel", "y", "x"]
    assert (raw.axes[2].size.min, raw.axes[2].size.step) == (52, 4)
    assert raw.data.type == "uint8" and tuple(raw.data.range) == (0.0, 255.0)
    assert [p.id for p in raw.preprocessing] == ["ensure_dtype", "scale_linear", "ensure_dtype"]
    assert raw.preprocessing[1].kwargs.gain == pytest.approx(1 / 255) and raw.pad.mode == "reflect"
    probs, = descr.outputs
    assert probs.axes[1].channel_names == ["membrane", "cell"]
    assert [a.halo for a in probs.axes[2:]] == [24, 24] and probs.axes[2].size.offset == 0
    assert descr.weights.onnx.parent == descr.weights.torchscript.parent == "pytorch_state_dict"
    assert [a.name for a in descr.authors] == ["Jane Doe", "John Roe"] and descr.authors[0].affiliation == "EM Lab"
    assert descr.license == "CC-BY-4.0" and "unet" in descr.tags
    assert any("Ronneberger" in c.text for c in descr.cite) and any("UNet_Medical" in c.text for c in descr.cite)
    assert "fold 0 of 5" in readme and "dice_nvidia | 0.6123" in readme
    from io import BytesIO

    from PIL import Image
    assert Image.open(BytesIO(cover)).size == (512, 256)  # the synthetic slice beside its overlay: 2:1


@needs_extra
@pytest.mark.slow
def test_tiled_prediction_matches_infer_py(package, tmp_path):
    """bioimageio.core, tiled as the package declares, gives infer.py's --probabilities on a 512x512 slice."""
    from bioimageio.core import Tensor, create_prediction_pipeline, load_description, predict
    ckpt, out = package
    image = make_synthetic_em(1, 512, 512, seed=3)[0][0]
    tifffile.imwrite(tmp_path / "slice.tif", image)
    subprocess.run([sys.executable, str(ROOT / "infer.py"), "--ckpt", str(ckpt), "--input", str(tmp_path / "slice.tif"),
                    "--output", str(tmp_path / "m.tif"), "--probabilities", str(tmp_path / "p.tif"),
                    "--device", "cpu", "--precision", "fp32", "--no-progress"], check=True, capture_output=True, cwd=ROOT)
    reference = tifffile.imread(tmp_path / "p.tif")
    descr = load_description(out)
    geom = package_geometry(_tiny_model())
    n = (256 + 2 * geom.halo - geom.min_size) // geom.step  # 256x256 inner blocks: 4 blocks of 304x304
    band = _tiny_model().edge_band
    for fmt in WEIGHT_FORMATS:
        # Not as a context manager: bioimageio.core 0.11.0's PredictionPipeline.unload() waits forever on
        # its model queue after a blocked prediction on CPU (seen here; the pipeline is freed with the object).
        pipeline = create_prediction_pipeline(descr, weight_format=fmt, devices=["cpu"])
        # A plain (batch, channel, y, x) tensor: a numpy array would be checked against the *block* sizes.
        sample = predict(model=pipeline, blocksize_parameter=n,
                         inputs=Tensor.from_numpy(image[None, None], dims=("batch", "channel", "y", "x")))
        assert sample.members["probabilities"].data.shape == (1, 2, 512, 512)
        cell = np.asarray(sample.members["probabilities"].data)[0, 1]
        diff = np.abs(cell - reference)
        print(f"{fmt}: max abs difference {diff[:-band, :-band].max():.2e} (whole slice but infer.py's "
              f"{band}-pixel edge band), {diff.max():.2e} (whole slice)")
        assert diff[:-band, :-band].max() <= TOLERANCE
        # infer.py used to predict this slice as one 552x552 tile whose bottom/right edge band (UNet.edge_band
        # rows/columns, reading the transposed convolutions' implicit zeros) fell inside the slice; since the
        # tiler keeps the band outside (issue 20), the whole slice should agree within TOLERANCE as well. The
        # looser bound stays until this slow test has run with that fix (not run in the session that made it).
        assert diff.max() < 0.05


@needs_extra
@pytest.mark.slow
def test_test_tensors_from_a_real_slice(isbi_dir, tmp_path):
    """--sample: the test input is the centre of the stack's first slice, mirror-padded by the halo."""
    import io
    ckpt = _checkpoint(tmp_path / "ck.pt", _tiny_model())
    out = tmp_path / "isbi.zip"
    assert _export(["--ckpt", str(ckpt), "--output", str(out), "--sample", str(isbi_dir / "test-volume.tif"),
                    "--weight-formats", "torchscript", *META]) == 0
    with zipfile.ZipFile(out) as z:
        test_input = np.load(io.BytesIO(z.read("test_input.npy")))
        test_output = np.load(io.BytesIO(z.read("test_output.npy")))
        names = set(z.namelist())
    first = tifffile.imread(isbi_dir / "test-volume.tif", key=0)
    assert test_input.shape == (1, 1, 304, 304) and test_input.dtype == np.uint8
    np.testing.assert_array_equal(test_input[0, 0, 24:-24, 24:-24], first[128:384, 128:384])
    np.testing.assert_array_equal(test_input[0, 0], np.pad(first[128:384, 128:384], 24, mode="reflect"))
    assert test_output.shape == (1, 2, 304, 304)
    assert "weights_torchscript.pt" in names and "weights.onnx" not in names and "weights.pt" not in names


# ------------------------------------------------------------------------------------------ bad input

def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        _export(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("export.py: error: ")
    return err


@pytest.fixture()
def small_ckpt(tmp_path):
    return _checkpoint(tmp_path / "ck.pt", _tiny_model())


META = ["--author", "Jane Doe", "--license", "MIT", "--no-test"]


def test_unknown_format(small_ckpt, tmp_path, capsys):
    assert "unknown package format 'keras'" in _fails(
        ["--ckpt", str(small_ckpt), "--output", str(tmp_path / "m.zip"), "--format", "keras", *META], capsys)
    assert "unknown output format '.tar'" in _fails(
        ["--ckpt", str(small_ckpt), "--output", str(tmp_path / "m.tar"), *META], capsys)
    assert "unknown weight format(s) ['keras_hdf5']" in _fails(
        ["--ckpt", str(small_ckpt), "--output", str(tmp_path / "m.zip"), "--weight-formats", "onnx,keras_hdf5",
         *META], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_incompatible_checkpoint(tmp_path, capsys):
    newer = _checkpoint(tmp_path / "ck.pt", _tiny_model())
    ckpt = torch.load(newer, weights_only=True)
    ckpt["version"] = VERSION + 1
    torch.save(ckpt, newer)
    err = _fails(["--ckpt", str(newer), "--output", str(tmp_path / "m.zip"), *META], capsys)
    assert f"format version {VERSION + 1}, newer than this unet-em" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_existing_output_needs_overwrite(small_ckpt, tmp_path, capsys):
    out = tmp_path / "m.zip"
    out.write_bytes(b"keep me")
    err = _fails(["--ckpt", str(small_ckpt), "--output", str(out), *META], capsys)
    assert "output exists; pass --overwrite" in err and out.read_bytes() == b"keep me"


@pytest.mark.parametrize("drop, message", [("--author", "--author is required (no default)"),
                                           ("--license", "--license is required (no default)")])
def test_missing_metadata(small_ckpt, tmp_path, capsys, drop, message):
    meta = list(META)
    i = meta.index(drop)
    del meta[i:i + 2]
    assert message in _fails(["--ckpt", str(small_ckpt), "--output", str(tmp_path / "m.zip"), *meta], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


@needs_extra
def test_bad_licence_leaves_nothing(small_ckpt, tmp_path, capsys):
    err = _fails(["--ckpt", str(small_ckpt), "--output", str(tmp_path / "m.zip"), "--author", "Jane Doe",
                  "--license", "Free-For-All", "--no-test"], capsys)
    assert "'Free-For-All' is not an SPDX licence identifier" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no package, no temporary file


@needs_extra
def test_unverifiable_github_user(small_ckpt, tmp_path, capsys):
    # Underscores are not allowed in GitHub names: a 404 with network, a connection error without.
    err = _fails(["--ckpt", str(small_ckpt), "--output", str(tmp_path / "m.zip"), "--maintainer", "no_such_user",
                  *META], capsys)
    assert "GitHub user 'no_such_user' (--author/--maintainer) could not be verified" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


@needs_extra
def test_metadata_json_is_plain(package):
    """The unet-em section of the rdf config holds the model config and the checkpoint's metrics as data."""
    from bioimageio.spec import load_model_description
    descr = load_model_description(package[1], perform_io_checks=False)
    extra = json.loads(json.dumps(descr.config.model_dump(mode="json")["unet_em"]))
    assert extra["model_config"]["depth"] == 3 and extra["validation_metrics"]["dice_nvidia"] == 0.6123


@needs_extra
def test_multi_class_package_describes_every_class(tmp_path):
    from bioimageio.spec import load_model_description
    torch.manual_seed(0)
    names = ["membrane", "cytoplasm", "organelle"]
    model = UNet(base_filters=2, depth=2, padding="same", num_classes=3, class_names=names)
    ckpt = _checkpoint(tmp_path / "m3.pt", model)
    out = tmp_path / "m3.zip"
    assert _export(["--ckpt", str(ckpt), "--output", str(out), "--author", "Jane Doe", "--license", "MIT"]) == 0
    descr = load_model_description(out, perform_io_checks=False)
    probs, = descr.outputs
    assert probs.axes[1].channel_names == names
    assert probs.description == "softmax, one channel per class (channel_names); argmax over channels = the class map"
    assert descr.name == "unet-em same UNet for EM segmentation (3 classes)"
    assert "segmenting membrane, cytoplasm, organelle in EM slices" in descr.description
    assert descr.config.model_dump(mode="json")["bioimageio"]["target_structure"] == names
    with zipfile.ZipFile(out) as z:
        readme = z.read("README.md").decode()
    assert "one probability per class (0 = 'membrane'" in readme and "segments membrane, cytoplasm, organelle" in readme
