"""Bad volumes and bad outputs: each one UserError line naming the file (unet.io.volumes / writers)."""
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tensorstore as ts
import tifffile
import zarr

from unet.data.synthetic import make_synthetic_em
from unet.errors import UserError
from unet.io.volumes import open_volume
from unet.io.volume_writers import create_volume, open_partial_volume


@pytest.fixture(scope="module")
def em() -> np.ndarray:
    return make_synthetic_em(3, 32, 48, seed=5)[0]


def _refused(spec, match, **kw) -> str:
    with pytest.raises(UserError, match=match) as info:
        open_volume(str(spec), **kw).close()
    message = str(info.value)
    assert "\n" not in message
    return message


def _container(tmp_path, em):
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="w", zarr_format=3)
    root.create_array("raw", data=em, chunks=(1, 16, 16))
    root.create_group("labels").create_array("cells", data=em, chunks=(1, 16, 16))
    return tmp_path / "c.zarr"


def test_missing_key_lists_the_keys_that_exist(tmp_path, em):
    c = _container(tmp_path, em)
    msg = _refused(f"{c}/rwa", "no array or image named 'rwa'")
    assert f"{c}/raw" in msg and f"{c}/labels/cells" in msg
    msg = _refused(f"{c}/labels", "group without OME-NGFF metadata")
    assert f"{c}/labels/cells" in msg
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["volumes/raw"] = em
        f["volumes/labels"] = em
    assert "d.h5/volumes/labels" in _refused(tmp_path / "d.h5/volumes/rawx", "no dataset named 'volumes/rawx'")
    assert "d.h5/volumes/raw" in _refused(tmp_path / "d.h5", "several datasets")
    zarr.create_array(str(tmp_path / "v2.zarr/volumes/raw"), data=em, zarr_format=2)  # v2: no root group
    assert "v2.zarr/volumes/raw" in _refused(tmp_path / "v2.zarr/raw", "no array or image named 'raw'")
    zarr.create_array(str(tmp_path / "root.zarr"), data=em, zarr_format=3)  # the array is the store's root
    assert f"are: {tmp_path}/root.zarr (the root)" in _refused(tmp_path / "root.zarr/raw", "no array or image named 'raw'")
    ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(tmp_path / "e.n5/raw")}, "create": True,
             "metadata": {"dimensions": [4, 4, 2], "blockSize": [4, 4, 1], "dataType": "uint8"}}).result()
    assert "e.n5/raw" in _refused(tmp_path / "e.n5/raws", "no N5 dataset named 'raws'")


def test_missing_and_unsupported_paths(tmp_path):
    _refused(tmp_path / "nothing.zarr/raw", "nothing.zarr: not found")
    _refused(tmp_path / "nothing.h5", "not found")
    _refused(tmp_path / "volume.mrc", "unsupported volume path")
    (tmp_path / "fake.h5").write_bytes(b"not hdf5 at all")
    _refused(tmp_path / "fake.h5/raw", "fake.h5/raw: cannot be opened as hdf5")


def test_wrong_rank(tmp_path, em):
    zarr.create_array(str(tmp_path / "line.zarr"), data=np.arange(10, dtype=np.uint8))
    _refused(tmp_path / "line.zarr", r"line.zarr: array has 1 dimensions \(10,\) and no axis names")
    with h5py.File(tmp_path / "four.h5", "w") as f:
        f["raw"] = np.stack([em, em], axis=1)
    _refused(tmp_path / "four.h5/raw", "four.h5/raw: array has 4 dimensions")
    with open_volume(str(tmp_path / "four.h5/raw"), axes="zcyx") as vol:  # named axes make it readable
        assert vol.shape == (3, 2, 32, 48)
    _refused(tmp_path / "four.h5/raw", "do not match the array's 4 dimensions", axes="zyx")


@pytest.mark.parametrize("dtype", ["int64", "complex64", "uint32"])
def test_unsupported_image_dtypes(tmp_path, em, dtype):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["raw"] = em.astype(dtype)
    msg = _refused(tmp_path / "d.h5/raw", f"d.h5/raw: pixel type {dtype} is not supported for images")
    assert "uint8, uint16 or float32" in msg


def test_label_volumes_take_integers_only(tmp_path, em):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["cells"] = em.astype(np.uint64)
        f["probs"] = em.astype(np.float32)
    with open_volume(str(tmp_path / "d.h5/cells"), labels=True) as vol:
        assert vol.dtype == np.uint64
    _refused(tmp_path / "d.h5/probs", "pixel type float32 is not supported for labels", labels=True)


def _ome(path, axes, shape, zarr_format=2):
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    root.create_array("0", shape=shape, dtype="uint8")
    ms = {"version": "0.4", "axes": [{"name": a} for a in axes], "datasets": [{"path": "0"}]}
    root.attrs.update({"multiscales": [ms]})
    return path


def test_ome_zarr_axes_scale_time_channel(tmp_path):
    _refused(_ome(tmp_path / "a.ome.zarr", ["angle", "y", "x"], (2, 8, 8)),
             r"a.ome.zarr: unknown axis name\(s\) \['angle'\]")
    t = _ome(tmp_path / "t.ome.zarr", "tzyx", (3, 2, 8, 8))
    _refused(t, r"t.ome.zarr: has 3 time points .* pick one with time=0..2")
    _refused(t, "time 3 does not exist", time=3)
    _refused(t, "scale 1 does not exist; the image has 1 level", time=0, scale=1)
    _refused(t, "has no channel axis", time=0, channel=1)
    zarr.create_array(str(tmp_path / "q.zarr"), shape=(2, 8, 8), dtype="uint8", dimension_names=["q", "y", "x"])
    _refused(tmp_path / "q.zarr", r"unknown axis name\(s\) \['q'\]")
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["raw"] = np.zeros((2, 8, 8), np.uint8)
    _refused(tmp_path / "d.h5/raw", "only OME-Zarr images have resolution levels", scale=1)


def _damage(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else b"\x13" * len(data))


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_corrupt_zarr_chunk_is_named(tmp_path, em, zarr_format):
    arr = zarr.create_array(str(tmp_path / "v.zarr/raw"), data=em, chunks=(1, 16, 16), zarr_format=zarr_format)
    key = arr.metadata.encode_chunk_key((1, 1, 2))
    _damage(tmp_path / "v.zarr/raw" / key)
    with open_volume(str(tmp_path / "v.zarr/raw")) as vol:
        np.testing.assert_array_equal(vol.read(slice(0, 1)), em[:1])  # other chunks still read
        with pytest.raises(UserError, match=rf"chunk \(1, 1, 2\) \({tmp_path}/v.zarr/raw/{key}\) cannot be read"):
            vol.read(slice(1, 3))


def test_corrupt_n5_hdf5_and_tiff_chunks_are_named(tmp_path, em):
    n5 = tmp_path / "v.n5/raw"
    ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(n5)}, "create": True,
             "metadata": {"dimensions": [48, 32, 3], "blockSize": [16, 16, 1], "dataType": "uint8",
                          "compression": {"type": "gzip"}}}).result()[...] = em.T
    _damage(n5 / "2" / "0" / "1", keep=1)  # N5 block (x=2, y=0, z=1): stored as z, y, x = (1, 0, 2)
    with open_volume(str(n5)) as vol, pytest.raises(UserError, match=r"v.n5/raw: chunk \(1, 0, 2\)"):
        vol.read()
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("raw", data=em, chunks=(1, 16, 16), compression="gzip")
        info = f["raw"].id.get_chunk_info_by_coord((2, 16, 0))
    with open(tmp_path / "d.h5", "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\x00" * info.size)
    with open_volume(str(tmp_path / "d.h5/raw")) as vol, \
            pytest.raises(UserError, match=r"chunk \(2, 1, 0\) of dataset /raw"):
        vol.read(slice(1, 3))
    tifffile.imwrite(tmp_path / "t.tif", em, photometric="minisblack", tile=(16, 16), compression="zlib")
    with tifffile.TiffFile(tmp_path / "t.tif") as tif:
        offset, size = tif.pages[1].dataoffsets[4], tif.pages[1].databytecounts[4]
    with open(tmp_path / "t.tif", "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * size)
    with open_volume(str(tmp_path / "t.tif")) as vol, \
            pytest.raises(UserError, match=r"t.tif: slice 1 tile/strip \(1, 1\)"):
        vol.read()


def test_truncated_tiff_names_the_page(tmp_path, em):
    tifffile.imwrite(tmp_path / "t.tif", em, photometric="minisblack")
    _damage(tmp_path / "t.tif", keep=0.6)
    _refused(tmp_path / "t.tif", r"t.tif: page \d+ cannot be read")


def test_outputs_refuse_existing_unsupported_and_misaligned(tmp_path, em):
    (tmp_path / "seg.ome.zarr").mkdir()
    with pytest.raises(UserError, match="seg.ome.zarr: exists"):
        create_volume(str(tmp_path / "seg.ome.zarr"), em.shape, em.dtype)
    with pytest.raises(UserError, match="chunked outputs are OME-Zarr"):
        create_volume(str(tmp_path / "seg.tif"), em.shape, em.dtype)
    with pytest.raises(UserError, match="folder .* does not exist"):
        create_volume(str(tmp_path / "no" / "seg.h5"), em.shape, em.dtype)
    with pytest.raises(UserError, match="no unfinished output"):
        open_partial_volume(str(tmp_path / "other.ome.zarr"))
    with create_volume(str(tmp_path / "seg.ome.zarr"), em.shape, em.dtype, (1, 16, 16), overwrite=True) as w:
        with pytest.raises(ValueError, match="not chunk-aligned"):
            w.write((0, 8, 0), em[:1, 8:24, :16])
        w.write((0, 16, 32), em[:1, 16:32, 32:48])  # ends at the volume's edge: fine
        w.commit()
    assert (tmp_path / "seg.ome.zarr" / "0").is_dir()


def test_hdf5_output_refuses_a_second_writer(tmp_path, em):
    spec = str(tmp_path / "pred.h5/mask")
    first = create_volume(spec, em.shape, em.dtype, (1, 16, 48))
    with pytest.raises(UserError, match="being written by another writer .* HDF5 files cannot be written by several"):
        open_partial_volume(spec)
    with pytest.raises(UserError, match="being written by another writer"):
        create_volume(spec, em.shape, em.dtype)
    assert not (tmp_path / "pred.h5").exists()  # nothing final until commit
    for z in range(3):
        first.write((z, 0, 0), em[z:z + 1, :16])
        first.write((z, 16, 0), em[z:z + 1, 16:])
    first.commit()
    assert not (tmp_path / "pred.h5.partial").exists() and not (tmp_path / "pred.h5.partial.lock").exists()
    with open_volume(spec) as vol:
        np.testing.assert_array_equal(vol.read(), em)


def test_hdf5_lock_holds_against_another_process(tmp_path, em):
    spec = str(tmp_path / "pred.h5")
    code = ("import sys; from unet.errors import UserError; from unet.io.volume_writers import open_partial_volume\n"
            "try:\n    open_partial_volume(sys.argv[1])\nexcept UserError as e:\n    print(e); sys.exit(2)")
    with create_volume(spec, em.shape, em.dtype):
        other = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=120,
                               cwd=Path(__file__).resolve().parents[1])
    assert other.returncode == 2 and "being written by another writer" in other.stdout, other.stderr
