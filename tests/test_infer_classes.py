"""infer.py with a K-class model (K = 3): --output is the class map (argmax) in every output kind, --probabilities
all K class probabilities (an ImageJ hyperstack ZCYX in TIFF, c/z/y/x volumes in OME-Zarr and HDF5), overlays in
class colours, --instances refused; a two-class model's outputs keep their format."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from unet.checkpoint import save_checkpoint
from unet.cli.commands import infer
from unet.device import setup_device
from unet.io.images import scale_by_dtype
from unet.io.volume_writers import create_volume, open_partial_volume
from unet.io.volumes import open_volume
from unet.io.writers import HyperstackWriter
from unet.prediction.ensemble import load_ensemble
from unet.prediction.overlay import CLASS_RGB, class_colours, overlay
from unet.prediction.predictor import predict_probabilities
from unet.prediction.tiling import TilingOptions
from infer_runs import read_volume as _read, run_infer as _run, write_em_volume
from tiny_models import balanced_unet

K = 3
NAMES = ["membrane", "cytoplasm", "organelle"]
SHAPE = (3, 40, 56)
TILES = ["--tile-size", "16", "--tile-batch", "1"]  # several 'same' windows per slice, one per forward
BLOCKS = ["--chunks", "16", "--block-size", "16"]  # 3 x 4 blocks per slice


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions; shared cores (conftest)


def _k_class_unet(seed: int = 0):
    return balanced_unet("same", seed=seed, base_filters=4, depth=3, num_classes=K, class_names=NAMES)


def _probabilities(ckpts: list[Path], images: np.ndarray) -> np.ndarray:
    """(Z, K, H, W): predict_probabilities slice by slice with infer.py's pinned tiling (the reference)."""
    dev = setup_device("cpu")
    model = dev.prepare_model(load_ensemble(ckpts)[0])  # infer.py's memory layout
    options = TilingOptions(tile_size=16, tile_batch=1)
    return np.stack([predict_probabilities(model, scale_by_dtype(img)[None], dev, options).numpy() for img in images])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A synthetic stack as TIFF and OME-Zarr, two K-class checkpoints, the first one's reference probabilities."""
    root = tmp_path_factory.mktemp("classes")
    images = write_em_volume(root / "em.ome.zarr", SHAPE)
    tifffile.imwrite(root / "stack.tif", images, photometric="minisblack")
    ckpts = [root / "k3.pt", root / "k3_seed1.pt"]
    for seed, path in enumerate(ckpts):
        save_checkpoint(path, _k_class_unet(seed))
    probs = _probabilities(ckpts[:1], images)
    classes = probs.argmax(1).astype(np.uint8)
    assert set(np.unique(classes).tolist()) == set(range(K))  # every class predicted: the tests mean something
    return {"root": root, "images": images, "ckpts": ckpts, "probs": probs, "classes": classes}


def _check_probabilities(p: np.ndarray, data: dict) -> None:
    """(Z, K, H, W) float32 probabilities: infer.py's equal the reference, and each pixel's sum to 1."""
    assert p.shape == (SHAPE[0], K, *SHAPE[1:]) and p.dtype == np.float32
    np.testing.assert_allclose(p, data["probs"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(p.sum(1), 1, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ TIFF

def test_tiff_class_map_and_probability_hyperstack(data, tmp_path):
    _run(data["ckpts"][0], "--input", data["root"] / "stack.tif", "--output", tmp_path / "m.tif",
         "--probabilities", tmp_path / "p.tif", *TILES)
    classes = tifffile.imread(tmp_path / "m.tif")
    assert classes.dtype == np.uint8
    np.testing.assert_array_equal(classes, data["classes"])
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        meta = tif.imagej_metadata
        assert (meta["channels"], meta["slices"], meta["images"], meta["hyperstack"]) == (K, SHAPE[0], K * SHAPE[0],
                                                                                           True)
        assert tif.series[0].axes == "ZCYX" and len(tif.pages) == K * SHAPE[0]
        assert tif.pages[0].compression == tifffile.COMPRESSION.NONE  # what ImageJ's hyperstack reader takes
        probs = tif.asarray()
    _check_probabilities(probs, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif", "p.tif"]  # no temporaries left


def test_folder_input_gives_class_maps_and_uint8_hyperstacks(data, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    tifffile.imwrite(src / "a.tif", data["images"][1:], photometric="minisblack")
    _run(data["ckpts"][0], "--input", src, "--output", tmp_path / "out", "--probabilities", tmp_path / "prob",
         "--prob-dtype", "uint8", *TILES)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "a.tif"), data["classes"][1:])
    with tifffile.TiffFile(tmp_path / "prob" / "a.tif") as tif:
        assert tif.imagej_metadata["channels"] == K and tif.series[0].axes == "ZCYX"
        probs = tif.asarray()
    assert probs.dtype == np.uint8
    np.testing.assert_array_equal(probs, np.rint(data["probs"][1:] * 255))


def test_hyperstack_writer_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError, match="stop"):
        with HyperstackWriter(tmp_path / "p.tif") as writer:
            writer.append(np.zeros((K, 8, 8), np.float32))
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------- chunked volumes

def _zarr_layout(container: Path) -> tuple[list, tuple, tuple]:
    """(OME axes, stored shape, stored chunks) of a v0.4 OME-Zarr image at a store's root, read from its files."""
    axes = json.loads((container / ".zattrs").read_text())["multiscales"][0]["axes"]
    array = json.loads((container / "0" / ".zarray").read_text())
    return axes, tuple(array["shape"]), tuple(array["chunks"])


def _check_probability_layout(spec: Path) -> None:
    """A K-class probability volume is stored c, z, y, x, chunked one channel and one slice deep."""
    stored = (K, *SHAPE)
    if spec.suffix == ".zarr":
        axes, shape, chunks = _zarr_layout(spec)
        assert axes == [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space"} for a in "zyx"]
    else:
        with h5py.File(spec.parent, "r") as f:
            ds = f[spec.name]
            assert [d.label for d in ds.dims] == list("czyx")
            shape, chunks = ds.shape, ds.chunks
    assert shape == stored and chunks == (1, 1, 16, 16)


@pytest.mark.parametrize("spec", ["p.zarr", "p.h5/prob"])
def test_channel_volume_reopened_for_resume_keeps_the_memory_order(tmp_path, spec):
    """A (Z, C, H, W) output stored c, z, y, x: a resumed run's writer (open_partial_volume) takes blocks in z, c, y, x
    order as the first run's did."""
    probs = np.random.default_rng(0).random((2, K, 8, 12), dtype=np.float32)
    with create_volume(str(tmp_path / spec), probs.shape, np.float32, (1, 1, 8, 12)) as first:
        first.write((0, 0, 0, 0), probs[:1])
    with open_partial_volume(str(tmp_path / spec)) as resumed:
        assert (resumed.axes, resumed.stored_axes, resumed.shape) == ("zcyx", "czyx", probs.shape)
        resumed.write((1, 0, 0, 0), probs[1:])
        resumed.commit()
    np.testing.assert_array_equal(_read(tmp_path / spec), probs)


@pytest.mark.parametrize("masks, probs", [("m.ome.zarr", "p.ome.zarr"), ("pred.h5/classes", "prob.h5/probs")])
def test_chunked_outputs_of_a_tiff_input(data, tmp_path, masks, probs):
    _run(data["ckpts"][0], "--input", data["root"] / "stack.tif", "--output", tmp_path / masks,
         "--probabilities", tmp_path / probs, "--chunks", "16", *TILES)
    np.testing.assert_array_equal(_read(tmp_path / masks), data["classes"])
    with open_volume(str(tmp_path / probs)) as vol:
        assert vol.axes == "zcyx"
        _check_probabilities(vol.read(), data)
    _check_probability_layout(tmp_path / probs)


@pytest.mark.parametrize("probs, dtype", [("p.zarr", "float32"), ("p.h5/prob", "uint8")])
def test_blockwise_outputs(data, tmp_path, capsys, probs, dtype):
    capsys.readouterr()
    _run(data["ckpts"][0], "--input", data["root"] / "em.ome.zarr", "--output", tmp_path / "m.zarr",
         "--probabilities", tmp_path / probs, "--prob-dtype", dtype, *TILES, *BLOCKS)
    assert "blocks: 36 of 36 predicted" in capsys.readouterr().out
    np.testing.assert_array_equal(_read(tmp_path / "m.zarr"), data["classes"])
    got = _read(tmp_path / probs)
    if dtype == "float32":
        _check_probabilities(got, data)
    else:
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, np.rint(data["probs"] * 255))
    _check_probability_layout(tmp_path / probs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.zarr", probs.split("/")[0]])  # committed


def test_ome_zarr_probabilities_open_in_ome_zarr_reader(data, tmp_path):
    parse_url = pytest.importorskip("ome_zarr.io").parse_url
    Reader = pytest.importorskip("ome_zarr.reader").Reader
    _run(data["ckpts"][0], "--input", data["root"] / "stack.tif", "--output", tmp_path / "m.tif",
         "--probabilities", tmp_path / "p.ome.zarr", *TILES)
    node = list(Reader(parse_url(str(tmp_path / "p.ome.zarr")))())[0]
    assert [a["name"] for a in node.metadata["axes"]] == ["c", "z", "y", "x"]
    np.testing.assert_allclose(np.asarray(node.data[0]), data["probs"].transpose(1, 0, 2, 3), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ ensembles, overlays

def test_ensemble_class_map_is_the_argmax_of_the_mean_probability(data, tmp_path):
    _run(data["ckpts"][0], data["ckpts"][1], "--input", data["root"] / "stack.tif", "--output", tmp_path / "m.tif",
         *TILES)
    mean = _probabilities(data["ckpts"], data["images"])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "m.tif"), mean.argmax(1))


def test_overlay_draws_each_class_in_its_colour(data, tmp_path):
    _run(data["ckpts"][0], "--input", data["root"] / "stack.tif", "--output", tmp_path / "m.tif",
         "--overlay", tmp_path / "ov", *TILES)
    pngs = sorted((tmp_path / "ov").iterdir())
    assert [p.name for p in pngs] == [f"stack_{k:03d}.png" for k in range(SHAPE[0])]
    for k, png in enumerate(pngs):
        with Image.open(png) as im:
            expected = overlay(scale_by_dtype(data["images"][k])[None], data["classes"][k], K)
            np.testing.assert_array_equal(np.asarray(im), expected)


def test_class_overlay_known_answer():
    classes = np.array([[0, 1, 2, 1]], dtype=np.uint8)
    black = np.zeros((1, 1, 4), np.float32)  # a flat image is stretched to black: only the colours remain
    expected = np.array([[[128, 0, 0], [0, 100, 0], [0, 45, 128], [0, 100, 0]]], dtype=np.uint8)  # half of each
    np.testing.assert_array_equal(overlay(black, classes, K), expected)
    colours = class_colours(40)
    assert colours.shape == (40, 3) and len({tuple(c) for c in colours}) == 40  # distinct beyond the table too
    np.testing.assert_array_equal(colours[:len(CLASS_RGB)], np.array(CLASS_RGB))


# ------------------------------------------------------------------------------------------------ refusals

def _refused(capsys, ckpt: Path, *argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        infer(["--ckpt", str(ckpt), *map(str, argv), "--device", "cpu", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("infer.py: error: "), err
    return err[0]


@pytest.mark.parametrize("instances", ["cells.tif", "cells.zarr"])
def test_instances_are_refused_for_k_classes(data, tmp_path, capsys, instances):
    err = _refused(capsys, data["ckpts"][0], "--input", data["root"] / "em.ome.zarr", "--output",
                   tmp_path / "m.zarr", "--instances", tmp_path / instances)
    assert "--instances" in err and "3 classes" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


# --------------------------------------------------------------------------------------- two classes

def test_two_class_outputs_keep_their_format(data, tmp_path):
    """A two-class model: 255/0 masks, one plain deflate page of cell probability per slice, a z/y/x volume."""
    ckpt = tmp_path / "binary.pt"
    save_checkpoint(ckpt, balanced_unet())
    out = tmp_path / "out"
    out.mkdir()
    _run(ckpt, "--input", data["root"] / "stack.tif", "--output", out / "m.tif", "--probabilities", out / "p.tif",
         *TILES)
    _run(ckpt, "--input", data["root"] / "stack.tif", "--output", out / "m.zarr", "--probabilities", out / "p.zarr",
         *TILES)
    probs = _probabilities([ckpt], data["images"])
    masks = tifffile.imread(out / "m.tif")
    np.testing.assert_array_equal(masks, (probs.argmax(1) == 1) * 255)
    assert set(np.unique(masks).tolist()) == {0, 255}
    with tifffile.TiffFile(out / "p.tif") as tif:
        assert not tif.is_imagej and len(tif.series) == 1 and len(tif.pages) == SHAPE[0]
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        cell = tif.asarray()
    assert cell.shape == SHAPE and cell.dtype == np.float32
    np.testing.assert_allclose(cell, probs[:, 1], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(_read(out / "m.zarr"), masks)
    np.testing.assert_array_equal(_read(out / "p.zarr"), cell)
    axes, shape, _ = _zarr_layout(out / "p.zarr")
    assert [a["name"] for a in axes] == list("zyx") and shape == SHAPE
