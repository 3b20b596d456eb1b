"""Model export: torch.export .pt2 with a dynamic batch dimension, ONNX gating, CLI errors."""
from pathlib import Path

import pytest
import torch

from unet.export import programs as export
from unet.checkpoint import save_checkpoint
from unet.cli.commands import export as export_cli, infer
from unet.errors import UserError
from unet.model import UNet


@pytest.fixture(scope="module")
def tiny() -> UNet:
    torch.manual_seed(0)
    return UNet(base_filters=2, depth=3, padding="valid").eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, tiny)
    return path


def test_default_tile_sizes():
    assert export.default_tile_size(UNet(base_filters=2)) == 572  # NVIDIA UNet_Medical's input
    assert export.default_tile_size(UNet(base_filters=2, padding="same")) == 512
    assert export.default_tile_size(UNet(base_filters=2, depth=3)) == 572
    assert export.default_tile_size(UNet(base_filters=2, depth=7)) == 764  # 572 is not valid that deep


def test_pt2_matches_eager_for_batch_1_and_3(ckpt, tiny, tmp_path, capsys):
    tile = tiny.valid_input_size(92)
    path = tmp_path / "model.pt2"
    assert export_cli(["--ckpt", str(ckpt), "--format", "pt2", "--output", str(path), "--example-size", str(tile)]) == 0
    assert "exported" in capsys.readouterr().out
    program = torch.export.load(str(path))
    for batch in (1, 3):
        x = torch.rand(batch, 1, tile, tile)
        with torch.no_grad():
            expected = tiny(x)
            got = program.module()(x)
        assert got.shape == expected.shape == (batch, 2, tiny.output_size(tile), tiny.output_size(tile))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    meta = export.load_export_metadata(path)
    assert meta["input_shape"] == ["N", 1, tile, tile] and meta["model_config"] == tiny.config.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]  # no temporary file left


def test_export_does_not_touch_the_callers_model(tiny, tmp_path):
    tiny.train()
    try:
        export.export_model(tiny, tmp_path / "m.pt2", tile_size=tiny.valid_input_size(92))
        assert tiny.training and next(tiny.parameters()).device.type == "cpu"
    finally:
        tiny.eval()


def test_export_errors(tiny, tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"nearest valid sizes"):
        export.export_model(tiny, tmp_path / "m.pt2", tile_size=93)
    with pytest.raises(UserError, match=r"\.pt2 .* or \.onnx"):
        export.export_model(tiny, tmp_path / "m.bin")
    with pytest.raises(UserError, match="does not exist"):
        export.export_model(tiny, tmp_path / "missing" / "m.pt2")
    (tmp_path / "old.pt2").write_bytes(b"x")
    with pytest.raises(UserError, match="--overwrite"):
        export.export_model(tiny, tmp_path / "old.pt2")
    monkeypatch.setattr(export, "onnx_available", lambda: False)
    with pytest.raises(UserError, match=r"pip install -e \.\[onnx\]"):
        export.export_model(tiny, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt2"]


def test_onnx_cli_error_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "onnx_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        export_cli(["--ckpt", str(ckpt), "--format", "onnx", "--output", str(tmp_path / "m.onnx")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export.py: error: ") and "pip install -e .[onnx]" in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--format", "pt2", "--output", "m.onnx"], "--format pt2 writes a .pt2 file"),
    (["--format", "onnx", "--output", "m.pt2"], "--format onnx writes a .onnx file"),
    (["--format", "pt2", "--output", "m.pt2", "--author", "Jane Doe"], "--author: only for --format bioimageio"),
    (["--output", "m.zip", "--example-size", "92"], "--example-size is for --format pt2|onnx"),
    (["--format", "pt2", "--output", "m.pt2", "--example-size", "0"], "argument --example-size: must be at least 1"),
])
def test_export_cli_refusals_are_one_line(ckpt, tmp_path, capsys, argv, message):
    argv = [str(tmp_path / a) if a.startswith("m.") else a for a in argv]
    with pytest.raises(SystemExit) as e:
        export_cli(["--ckpt", str(ckpt), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("export.py: error: ") and message in err[-1], err
    assert list(tmp_path.iterdir()) == []


def test_infer_export_points_to_export_py(ckpt, tmp_path, capsys):
    """infer.py --export only says which command writes programs now (exit 2, nothing written)."""
    with pytest.raises(SystemExit) as e:
        infer(["--ckpt", str(ckpt), "--export", str(tmp_path / "m.pt2"), "--tile-size", "92"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run python export.py --format pt2|onnx" in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not export.onnx_available(), reason="onnx/onnxscript not installed (pip install -e .[onnx])")
def test_onnx_export_runs(tiny, tmp_path):
    path = export.export_model(tiny, tmp_path / "m.onnx", tile_size=tiny.valid_input_size(92))
    import onnx
    onnx.checker.check_model(onnx.load(str(path)))


@pytest.mark.parametrize("error", [
    ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB: 2147483800"),
    RuntimeError("The serialized model is larger than the 2GiB limit imposed by the protobuf library."),
])
def test_onnx_over_the_protobuf_limit_is_one_line(ckpt, tmp_path, capsys, monkeypatch, error):
    """Issue 22 item 5: protobuf's 2 GiB ceiling, raised from inside the exporter's save, ends in one line."""
    class Program:
        def save(self, destination, **kwargs):
            Path(destination).write_bytes(b"partial")  # what a real save may leave before it fails
            raise error

    monkeypatch.setattr(export, "onnx_available", lambda: True)
    monkeypatch.setattr(export, "_trace", lambda *a, **k: Program())
    with pytest.raises(SystemExit) as e:
        export_cli(["--ckpt", str(ckpt), "--format", "onnx", "--output", str(tmp_path / "m.onnx")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export.py: error: "), err
    assert "m.onnx" in err[0] and "2 GiB" in err[0] and "--format pt2" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_other_onnx_errors_are_not_taken_for_the_size_limit(tiny, tmp_path, monkeypatch):
    class Program:
        def save(self, destination, **kwargs):
            raise ValueError("something else")

    monkeypatch.setattr(export, "onnx_available", lambda: True)
    monkeypatch.setattr(export, "_trace", lambda *a, **k: Program())
    with pytest.raises(ValueError, match="something else"):
        export.export_model(tiny, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
