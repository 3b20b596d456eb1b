"""infer.py on chunked volumes: OME-Zarr / zarr / HDF5 inputs read lazily slice batch by slice batch, and
OME-Zarr / HDF5 outputs holding exactly what the TIFF outputs hold; bad input through the real command."""
from pathlib import Path

import h5py
import numpy as np
import pytest
import tensorstore as ts
import tifffile
import zarr

from unet.checkpoint import save_checkpoint
from unet.cli.commands import infer
from unet.data.synthetic import make_synthetic_em
from unet.io.volume_writers import create_volume
from unet.io.volumes import open_volume
from unet.prediction import stacks
from tiny_models import balanced_unet

SHAPE = (5, 40, 56)  # odd depth, so the last slice batch of --read-batch 2 is short


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions; shared cores (conftest)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The same synthetic stack as a TIFF, an OME-Zarr, a plain zarr v3 array, N5, HDF5; the TIFF's outputs."""
    root = tmp_path_factory.mktemp("volumes")
    ckpt = root / "tiny.pt"
    save_checkpoint(ckpt, balanced_unet())
    images, _ = make_synthetic_em(*SHAPE, seed=3)
    tifffile.imwrite(root / "stack.tif", images, photometric="minisblack")
    w = create_volume(str(root / "em.ome.zarr"), images.shape, np.uint8, (1, 16, 16))  # several chunks per slice
    for z in range(len(images)):
        w.write((z, 0, 0), images[z:z + 1])
    w.commit()
    zarr.create_array(str(root / "plain.zarr"), name="raw", data=images, chunks=(2, 32, 32), zarr_format=3)
    n5 = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(root / "em.n5" / "raw")}, "create": True,
                  "metadata": {"dimensions": list(images.shape[::-1]), "blockSize": [16, 16, 1], "dataType": "uint8",
                               "compression": {"type": "gzip"}}}).result()
    n5[...] = images.T  # N5 lists dimensions x, y, z
    with h5py.File(root / "em.h5", "w") as f:
        f.create_dataset("volumes/raw", data=images, chunks=(1, 20, 28))
        f.create_dataset("volumes/other", data=images[:1])
    out = root / "tiff_out"
    out.mkdir()
    _run(ckpt, "--input", root / "stack.tif", "--output", out / "m.tif", "--probabilities", out / "p.tif",
         "--instances", out / "i.tif")
    _run(ckpt, "--input", root / "stack.tif", "--output", out / "m2.tif", "--probabilities", out / "p8.tif",
         "--prob-dtype", "uint8")
    return {"root": root, "ckpt": ckpt, "images": images, "masks": tifffile.imread(out / "m.tif"),
            "probabilities": tifffile.imread(out / "p.tif"), "prob_uint8": tifffile.imread(out / "p8.tif"),
            "instances": tifffile.imread(out / "i.tif")}


def _run(ckpt: Path, *argv) -> None:
    assert infer(["--ckpt", str(ckpt), *map(str, argv), "--device", "cpu", "--no-progress"]) == 0


def _read(spec: str, labels: bool = False) -> np.ndarray:
    with open_volume(spec, labels=labels) as vol:
        assert vol.axes == "zyx"
        return vol.read()


def _refused(capsys, ckpt: Path, folder: Path, *argv) -> str:
    """Run infer.py expecting exit 2; the one stderr line, after checking that nothing was written in ``folder``."""
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        infer(["--ckpt", str(ckpt), *map(str, argv), "--device", "cpu", "--no-progress"])
    assert e.value.code == 2
    # A fault found mid-run follows the "predicting N slices ..." line; nothing else.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("predicting ")]
    assert len(err) == 1 and err[0].startswith("infer.py: error: "), err
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    return err[0]


# ------------------------------------------------------------------------------------------------ inputs

@pytest.mark.parametrize("spec", ["em.ome.zarr", "plain.zarr/raw", "em.n5/raw", "em.h5/volumes/raw"])
def test_volume_inputs_give_the_masks_of_the_tiff_stack(data, tmp_path, volume_reads, spec):
    reads = volume_reads
    _run(data["ckpt"], "--input", data["root"] / spec, "--output", tmp_path / "m.tif", "--read-batch", "2")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "m.tif"), data["masks"])
    # Streamed: whole slices, two at a time, never the whole volume at once.
    assert [(z.start, z.stop) for z, _, _ in reads] == [(0, 2), (2, 4), (4, 6)]
    assert all(y == slice(None) and x == slice(None) for _, y, x in reads)


def test_volume_channel_and_time_are_picked(data, tmp_path, capsys):
    """A czyx OME-Zarr with two channels: --channel picks one; a tczyx array needs no --time with one time point."""
    images = data["images"]
    w = create_volume(str(tmp_path / "two.ome.zarr"), (SHAPE[0], 2) + SHAPE[1:], np.uint8, (1, 2, 16, 16))
    w.write((0, 0, 0, 0), np.stack([255 - images, images], axis=1))
    w.commit()
    line = _refused(capsys, data["ckpt"], tmp_path, "--input", tmp_path / "two.ome.zarr", "--output", tmp_path / "m.tif")
    assert "two.ome.zarr: has 2 channels but the model takes 1; pick one with --channel 0..1" in line
    _run(data["ckpt"], "--input", tmp_path / "two.ome.zarr", "--channel", "1", "--output", tmp_path / "m.tif")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "m.tif"), data["masks"])
    tczyx = tmp_path / "t.zarr"
    zarr.create_array(str(tczyx), name="raw", data=images[None, :, None], chunks=(1, 1, 1, 20, 28), zarr_format=3,
                      dimension_names=list("tzcyx"))
    _run(data["ckpt"], "--input", tczyx / "raw", "--output", tmp_path / "t.tif", "--time", "0")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "t.tif"), data["masks"])


# ----------------------------------------------------------------------------------------------- outputs

def test_chunked_outputs_hold_exactly_the_tiff_outputs(data, tmp_path):
    _run(data["ckpt"], "--input", data["root"] / "stack.tif", "--output", tmp_path / "masks.ome.zarr",
         "--probabilities", tmp_path / "pred.h5/probabilities", "--instances", tmp_path / "cells.zarr/labels",
         "--chunks", "16x32")
    masks, probs = _read(str(tmp_path / "masks.ome.zarr")), _read(str(tmp_path / "pred.h5/probabilities"))
    cells = _read(str(tmp_path / "cells.zarr/labels"), labels=True)
    assert (masks.dtype, probs.dtype, cells.dtype) == (np.uint8, np.float32, np.uint32)
    np.testing.assert_array_equal(masks, data["masks"])
    np.testing.assert_array_equal(probs, data["probabilities"])
    np.testing.assert_array_equal(cells, data["instances"])
    with open_volume(str(tmp_path / "masks.ome.zarr")) as vol:
        assert vol.chunks == (1, 16, 32)
    with open_volume(str(tmp_path / "pred.h5/probabilities")) as vol:
        assert vol.chunks == (1, 16, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.zarr", "masks.ome.zarr", "pred.h5"]  # no .partial


def test_hdf5_and_zarr_outputs_from_a_volume_input(data, tmp_path):
    """Volume in, volume out; uint8 probabilities; HDF5 without a key writes the dataset 'data'; default chunks."""
    _run(data["ckpt"], "--input", data["root"] / "em.h5/volumes/raw", "--output", tmp_path / "masks.h5",
         "--probabilities", tmp_path / "p.zarr", "--prob-dtype", "uint8")
    with h5py.File(tmp_path / "masks.h5", "r") as f:
        assert list(f) == ["data"]
        np.testing.assert_array_equal(f["data"][()], data["masks"])
        assert f["data"].chunks == (1,) + SHAPE[1:]  # 512 x 512 by default, clamped to the slice
    probs = _read(str(tmp_path / "p.zarr"))
    assert probs.dtype == np.uint8
    np.testing.assert_array_equal(probs, data["prob_uint8"])


def test_ome_zarr_output_opens_in_ome_zarr_reader(data, tmp_path):
    parse_url = pytest.importorskip("ome_zarr.io").parse_url
    Reader = pytest.importorskip("ome_zarr.reader").Reader
    _run(data["ckpt"], "--input", data["root"] / "em.ome.zarr", "--output", tmp_path / "pred.ome.zarr")
    node = list(Reader(parse_url(str(tmp_path / "pred.ome.zarr")))())[0]
    assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
    np.testing.assert_array_equal(np.asarray(node.data[0]), data["masks"])


def test_overwrite_replaces_a_chunked_output(data, tmp_path):
    out = tmp_path / "m.zarr"
    _run(data["ckpt"], "--input", data["root"] / "stack.tif", "--output", out, "--chunks", "8")
    _run(data["ckpt"], "--input", data["root"] / "stack.tif", "--output", out, "--overwrite")
    np.testing.assert_array_equal(_read(str(out)), data["masks"])
    with open_volume(str(out)) as vol:
        assert vol.chunks == (1,) + SHAPE[1:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr"]


def test_a_failed_run_leaves_no_chunked_output(data, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(stacks, "cell_instances", boom)  # fails in the writer thread, after the first slice
    with pytest.raises(RuntimeError, match="device lost"):
        infer(["--ckpt", str(data["ckpt"]), "--input", str(data["root"] / "stack.tif"), "--output",
               str(tmp_path / "m.zarr"), "--instances", str(tmp_path / "c.h5/cells"), "--device", "cpu",
               "--no-progress"])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("blockwise", [False, "inline", "threads"])
def test_non_finite_pixels_mid_volume(data, tmp_path, capsys, blockwise):
    """Found by the reader at slice 3, after the outputs were started: one line. A TIFF output leaves nothing; a
    block-wise run (chunked outputs) keeps its finished blocks for --resume (after the input is mended), whether
    the block reader is inline or its own thread (--block-io)."""
    images = data["images"].astype(np.float32) / 255
    images[3, 5, 7] = np.nan
    vol = tmp_path / "in"
    vol.mkdir()
    with h5py.File(vol / "f.h5", "w") as f:
        f.create_dataset("raw", data=images, chunks=(1, 40, 56))
    out = tmp_path / "out"
    out.mkdir()
    outputs = (["--output", out / "m.zarr", "--probabilities", out / "p.h5/prob", "--block-io", blockwise]
               if blockwise else ["--output", out / "m.tif"])
    line = _refused(capsys, data["ckpt"], vol, "--input", vol / "f.h5", "--read-batch", "2", *outputs)
    assert "in/f.h5: slice 3 has 1 non-finite pixel(s)" in line  # its only dataset: no key needed
    left = sorted(p.name for p in out.iterdir())
    assert left == (["m.zarr.partial", "m.zarr.unet_blocks", "p.h5.partial"] if blockwise else [])
    if blockwise:  # at most slices 0-2 (one block each), as far as their tiles' batches got
        assert len(list((out / "m.zarr.unet_blocks" / "done").iterdir())) <= 3


def test_missing_key_lists_the_keys(data, tmp_path, capsys):
    line = _refused(capsys, data["ckpt"], tmp_path, "--input", data["root"] / "em.h5/volumes/rwa",
                    "--output", tmp_path / "m.zarr")
    assert "em.h5/volumes/raw" in line and "em.h5/volumes/other" in line


def test_existing_output_needs_overwrite(data, tmp_path, capsys):
    (tmp_path / "m.zarr").mkdir()
    line = _refused(capsys, data["ckpt"], tmp_path, "--input", data["root"] / "em.ome.zarr",
                    "--output", tmp_path / "m.zarr/masks")
    assert "m.zarr: output exists; pass --overwrite" in line


def test_channel_on_a_single_channel_volume(data, tmp_path, capsys):
    line = _refused(capsys, data["ckpt"], tmp_path, "--input", data["root"] / "em.ome.zarr", "--channel", "1",
                    "--output", tmp_path / "m.zarr")
    assert "em.ome.zarr: has no channel axis" in line


@pytest.mark.parametrize("argv, message", [
    (["--input", "stack.tif", "--scale", "1"], "--scale 1: only for zarr, N5 or HDF5 volume inputs"),
    (["--input", "em.ome.zarr", "--scale", "1"], "scale 1 does not exist"),
    (["--input", "em.ome.zarr", "--output", "OUT/m.n5/raw"], "cannot be written as N5"),
    (["--input", "em.ome.zarr", "--output", "OUT/m.zarr", "--probabilities", "OUT/m.zarr/p"],
     "two outputs have this name (or container)"),
    (["--input", "em.h5/volumes/raw", "--output", "em.h5/volumes/masks"], "would overwrite an input"),
    (["--input", "em.ome.zarr", "--output", "OUT/missing/m.zarr"], "folder OUT/missing does not exist"),
    (["--input", "em.ome.zarr", "--output", "OUT/m.zarr", "--chunks", "0x8"], "argument --chunks: must be N or HxW"),
])
def test_bad_volume_arguments(data, tmp_path, capsys, argv, message):
    root = data["root"]
    argv = [a.replace("OUT", str(tmp_path)) if a.startswith("OUT") else str(root / a) if "." in a else a
            for a in argv]
    argv += [] if "--output" in argv else ["--output", str(tmp_path / "m.zarr")]
    if message.startswith("argument"):  # argparse's own usage error: exit 2, usage line and the message
        with pytest.raises(SystemExit) as e:
            infer(["--ckpt", str(data["ckpt"]), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
        return
    line = _refused(capsys, data["ckpt"], tmp_path, *argv)
    assert message.replace("OUT", str(tmp_path)) in line
    assert sorted(p.name for p in root.iterdir()) == ["em.h5", "em.n5", "em.ome.zarr", "plain.zarr", "stack.tif",
                                                      "tiff_out", "tiny.pt"]
