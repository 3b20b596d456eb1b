"""The chunked volume layer (unet.io.volumes / writers): round trips, region reads, laziness, OME-Zarr levels
and axes, read-back with ome-zarr's own reader. Volumes are made on the fly from the synthetic EM set."""
import inspect

import h5py
import numpy as np
import pytest
import tensorstore as ts
import tifffile
import zarr
from PIL import Image

from ome_files import write_ome_zarr
from unet.data.synthetic import make_synthetic_em
from unet.errors import UserError
from unet.io.images import read_stack
from unet.io.volumes import open_volume
from unet.io.volume_writers import create_volume, open_partial_volume

REGIONS = [(slice(None), slice(None), slice(None)), (slice(1, 3), slice(5, 40), slice(17, 63)),
           (slice(2, 3), slice(0, 1), slice(63, 64)), (slice(-2, None), slice(30, 10), slice(None))]


@pytest.fixture(scope="module")
def em() -> np.ndarray:
    images, _ = make_synthetic_em(4, 48, 64, seed=3)
    return images  # (4, 48, 64) uint8


def _write_zarr(path, data, zarr_format, chunks=(1, 16, 16)):
    arr = zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, zarr_format=zarr_format)
    arr[...] = data
    return arr


def _write_n5(path, data, block=(16, 16, 1)):
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(path)}, "create": True,
                     "metadata": {"dimensions": list(data.shape[::-1]), "blockSize": list(block),
                                  "dataType": str(data.dtype), "compression": {"type": "gzip"}}}).result()
    store[...] = data.T
    return store


def _write_output(spec, data, chunks=(1, 16, 32), **kw):
    with create_volume(spec, data.shape, data.dtype, chunks, **kw) as w:
        for z in range(data.shape[0]):
            for y in range(0, data.shape[-2], chunks[-2]):
                w.write((z,) + (0,) * (data.ndim - 3) + (y, 0), data[z:z + 1, ..., y:y + chunks[-2], :])
        w.commit()


def _make(kind, tmp_path, data):
    """Write ``data`` in format ``kind``; return the volume path to open."""
    if kind == "tiff":
        tifffile.imwrite(tmp_path / "s.tif", data, photometric="minisblack")
        return str(tmp_path / "s.tif")
    if kind == "tiff-tiled":  # compressed tiles: read through tifffile's zarr interface
        tifffile.imwrite(tmp_path / "t.tif", data, photometric="minisblack", tile=(16, 16), compression="zlib")
        return str(tmp_path / "t.tif")
    if kind in ("zarr2", "zarr3"):
        _write_zarr(tmp_path / "v.zarr" / "raw", data, int(kind[-1]))
        return str(tmp_path / "v.zarr" / "raw")
    if kind == "n5":
        _write_n5(tmp_path / "v.n5" / "volumes" / "raw", data)
        return str(tmp_path / "v.n5" / "volumes" / "raw")
    if kind in ("ome04", "ome05"):
        _write_output(str(tmp_path / "v.ome.zarr"), data, zarr_format=2 if kind == "ome04" else 3)
        return str(tmp_path / "v.ome.zarr")
    _write_output(str(tmp_path / "v.h5" / "volumes" / "raw"), data)
    return str(tmp_path / "v.h5" / "volumes" / "raw")


@pytest.mark.parametrize("kind", ["tiff", "tiff-tiled", "zarr2", "zarr3", "n5", "ome04", "ome05", "hdf5"])
def test_round_trip_and_region_reads_equal_numpy(kind, tmp_path, em):
    with open_volume(_make(kind, tmp_path, em)) as vol:
        assert (vol.shape, vol.axes, vol.dtype) == (em.shape, "zyx", em.dtype)
        np.testing.assert_array_equal(vol.read(), em)
        for region in REGIONS:
            np.testing.assert_array_equal(vol.read(*region), em[region])


def test_chunk_shapes_come_from_the_files(tmp_path, em):
    with open_volume(_make("tiff-tiled", tmp_path, em)) as vol:
        assert vol.chunks == (1, 16, 16)
    with open_volume(_make("n5", tmp_path, em)) as vol:
        assert vol.chunks == (1, 16, 16)
    with open_volume(_make("hdf5", tmp_path, em)) as vol:
        assert vol.chunks == (1, 16, 32)


def test_png_and_single_slice_arrays(tmp_path, em):
    Image.fromarray(em[0]).save(tmp_path / "a.png")
    with open_volume(str(tmp_path / "a.png")) as vol:
        assert vol.shape == (1, 48, 64)
        np.testing.assert_array_equal(vol.read(y=slice(3, 9)), em[:1, 3:9])
    _write_zarr(tmp_path / "p.zarr", em[1], 2, chunks=(16, 16))  # 2-D array: one slice
    with open_volume(str(tmp_path / "p.zarr")) as vol:
        assert vol.shape == (1, 48, 64)
        np.testing.assert_array_equal(vol.read(slice(0, 1), slice(4, 8)), em[1:2, 4:8])
        assert vol.read(slice(1, 1)).shape == (0, 48, 64)


def test_multichannel_outputs_keep_channels(tmp_path, em):
    probs = np.stack([em, 255 - em], axis=1).astype(np.float32) / 255  # (Z, C, Y, X)
    for spec, kw in ((str(tmp_path / "p.zarr/probs"), {}), (str(tmp_path / "p.h5/probs"), {})):
        _write_output(spec, probs, chunks=(1, 2, 16, 32), **kw)
        with open_volume(spec) as vol:
            assert vol.axes == "zcyx" and vol.shape == probs.shape
            np.testing.assert_array_equal(vol.read(slice(1, 3), slice(5, 20)), probs[1:3, :, 5:20])
        with open_volume(spec, channel=1) as vol:
            assert vol.axes == "zyx"
            np.testing.assert_array_equal(vol.read(), probs[:, 1])


def test_region_read_touches_only_its_chunks(tmp_path, em, monkeypatch):
    spec = _make("zarr3", tmp_path, em)
    keys = []
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        keys.append(key)
        return await original(self, key, *args, **kwargs)

    with open_volume(spec) as vol:
        monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
        vol.read(slice(1, 3), slice(16, 32), slice(20, 40))  # z 1..2, y chunk 1, x chunks 1..2
    chunk_keys = sorted(k for k in keys if "/c/" in k or k.startswith("c/"))
    assert chunk_keys == sorted(f"raw/c/{z}/1/{x}" for z in (1, 2) for x in (1, 2)), keys


@pytest.mark.parametrize("layout, expected", [(dict(tile=(32, 32)), 1), (dict(rowsperstrip=16), 2)])
def test_tiff_window_of_a_page_decodes_only_its_tiles_or_strips(tmp_path, monkeypatch, layout, expected):
    big = np.arange(256 * 256, dtype=np.uint16).reshape(1, 256, 256)
    tifffile.imwrite(tmp_path / "big.tif", big, photometric="minisblack", compression="zlib", **layout)
    decoded = []
    original = inspect.getattr_static(tifffile.TiffPage, "decode").func  # a cached_property in tifffile

    def counting(self):
        inner = original(self)

        def decode(data, index, **kw):
            decoded.append(index)
            return inner(data, index, **kw)
        return decode

    monkeypatch.setattr(tifffile.TiffPage, "decode", property(counting))
    with open_volume(str(tmp_path / "big.tif")) as vol:
        np.testing.assert_array_equal(vol.read(y=slice(40, 60), x=slice(70, 90)), big[:, 40:60, 70:90])
    assert len(decoded) == expected, decoded  # one 32 x 32 tile of 64, or two 16-row strips of 16


def _ome_group(path, zarr_format, axes, shapes, version_key):
    levels = [(np.arange(np.prod(shape)) % 251).astype(np.uint8).reshape(shape) + k for k, shape in enumerate(shapes)]
    return write_ome_zarr(path, axes, levels, zarr_format=zarr_format, version_key=version_key)


@pytest.mark.parametrize("zarr_format, version_key", [(2, "top"), (3, "ome")])
def test_ome_zarr_scale_and_axes_selection(tmp_path, zarr_format, version_key):
    path = tmp_path / "img.ome.zarr"
    levels = _ome_group(path, zarr_format, "tczyx", [(2, 3, 4, 16, 20), (2, 3, 4, 8, 10)], version_key)
    with open_volume(str(path), time=1) as vol:
        assert vol.axes == "zcyx" and vol.shape == (4, 3, 16, 20)
        zcyx = levels[0][1].transpose(1, 0, 2, 3)  # time point 1, channels after z
        np.testing.assert_array_equal(vol.read(slice(1, 3), slice(2, 9)), zcyx[1:3, :, 2:9])
    with open_volume(str(path), scale=1, time=0, channel=2) as vol:
        assert vol.shape == (4, 8, 10)
        np.testing.assert_array_equal(vol.read(), levels[1][0, 2])


def test_ome_zarr_output_opens_in_ome_zarr_reader(tmp_path, em):
    parse_url = pytest.importorskip("ome_zarr.io").parse_url  # the test extra; not needed at run time
    Reader = pytest.importorskip("ome_zarr.reader").Reader

    for zarr_format in (2, 3):
        spec = str(tmp_path / f"seg{zarr_format}.ome.zarr")
        _write_output(spec, em, zarr_format=zarr_format)
        node = list(Reader(parse_url(spec))())[0]
        assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
        np.testing.assert_array_equal(np.asarray(node.data[0]), em)


def test_output_appears_only_on_commit(tmp_path, em):
    spec = str(tmp_path / "seg.ome.zarr")
    w = create_volume(spec, em.shape, em.dtype, (1, 16, 32))
    w.write((0, 0, 0), em[:1, :16])
    w.close()  # killed before the end: nothing at the final name
    assert not (tmp_path / "seg.ome.zarr").exists() and (tmp_path / "seg.ome.zarr.partial").is_dir()
    other = open_partial_volume(spec)  # another process (or a resume) joins and finishes
    assert (other.shape, other.chunks, other.axes) == (em.shape, (1, 16, 32), "zyx")
    for z in range(4):
        for y in (0, 16, 32):
            other.write((z, y, 0), em[z:z + 1, y:y + 16])
    other.commit()
    assert not (tmp_path / "seg.ome.zarr.partial").exists()
    with open_volume(spec) as vol:
        np.testing.assert_array_equal(vol.read(), em)


def test_float64_images_are_read_as_stored(tmp_path, em):
    data = em.astype(np.float64) / 255
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["raw"] = data
    with open_volume(str(tmp_path / "f.h5/raw")) as vol:
        assert vol.dtype == np.float64
        np.testing.assert_array_equal(vol.read(), data)



_TIFF_LAYOUTS = {  # name -> (shape, dtype, tifffile.imwrite keywords)
    "rgb": ((2, 20, 30, 3), np.uint8, dict(photometric="rgb")),
    "rgb-planar": ((2, 3, 20, 30), np.uint8, dict(photometric="rgb", planarconfig="separate")),
    "imagej-tzcyx": ((2, 3, 2, 20, 30), np.uint8, dict(imagej=True, metadata={"axes": "TZCYX"})),
    "tzcyx-zlib": ((2, 3, 2, 20, 30), np.uint16, dict(photometric="minisblack", metadata={"axes": "TZCYX"},
                                                      compression="zlib")),
    "one-page": ((20, 30), np.uint8, {}),
}


@pytest.mark.parametrize("layout", sorted(_TIFF_LAYOUTS))
def test_tiff_layouts_read_as_read_stack_reads_them(layout, tmp_path):
    shape, dtype, kw = _TIFF_LAYOUTS[layout]
    data = np.random.default_rng(1).integers(0, 255, shape).astype(dtype)
    tifffile.imwrite(tmp_path / "s.tif", data, **kw)
    whole = read_stack(tmp_path / "s.tif")
    with open_volume(str(tmp_path / "s.tif")) as vol:
        assert vol.shape == whole.shape and vol.axes == ("zcyx" if whole.ndim == 4 else "zyx")
        np.testing.assert_array_equal(vol.read(), whole)
        np.testing.assert_array_equal(vol.read(slice(0, 1), slice(3, 9), slice(4, 20)), whole[:1, ..., 3:9, 4:20])
    if whole.ndim == 4:
        with open_volume(str(tmp_path / "s.tif"), channel=1) as vol:
            np.testing.assert_array_equal(vol.read(y=slice(2, 5)), whole[:, 1, 2:5])


def test_hdf5_region_read_reads_only_its_chunks(tmp_path, monkeypatch):
    data = (np.arange(8 * 128 * 128) % 65521).astype(np.uint16).reshape(8, 128, 128)  # 256 KiB, 128 chunks of 2 KiB
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("raw", data=data, chunks=(1, 16, 64))
    read_bytes = []

    class Counting:  # a file object that counts what HDF5 reads through it
        def __init__(self, path):
            self.fh = open(path, "rb")

        def readinto(self, buffer):
            n = self.fh.readinto(buffer)
            read_bytes.append(n)
            return n

        def read(self, n=-1):
            out = self.fh.read(n)
            read_bytes.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.fh, name)

    real = h5py.File
    monkeypatch.setattr(h5py, "File", lambda path, mode="r": real(Counting(path), mode))
    with open_volume(str(tmp_path / "d.h5/raw")) as vol:
        read_bytes.clear()
        np.testing.assert_array_equal(vol.read(slice(2, 4), slice(16, 32), slice(40, 80)), data[2:4, 16:32, 40:80])
    # 2 slices x 1 chunk row x 2 chunk columns = 4 chunks of 2 KiB, plus the chunk index's B-tree nodes (about
    # 6 KiB with h5py 3.16); the bound leaves room for other HDF5 versions and is still 1/8 of the file
    assert 4 * 2048 <= sum(read_bytes) < 16 * 2048, sum(read_bytes)


def test_n5_region_read_never_opens_other_chunks(tmp_path, em):
    # Every chunk outside the region is made undecodable: the read succeeds only if it never touches them.
    spec = _make("n5", tmp_path, em)
    needed = {(x, 1, z) for x in (1, 2) for z in (1, 2)}  # N5 block coordinates are x, y, z
    damaged = 0
    for block in (tmp_path / "v.n5" / "volumes" / "raw").glob("*/*/*"):
        coords = tuple(int(p) for p in block.relative_to(block.parents[2]).parts)
        if coords not in needed:
            block.write_bytes(b"\xff" * 40)
            damaged += 1
    assert damaged == 4 * 3 * 4 - len(needed)
    with open_volume(spec) as vol:
        np.testing.assert_array_equal(vol.read(slice(1, 3), slice(16, 32), slice(20, 40)), em[1:3, 16:32, 20:40])
        with pytest.raises(UserError, match=r"chunk \(0, "):
            vol.read(slice(0, 1))
