"""HDF5 gzip chunks (de)compressed in threads (unet.io.hdf5_chunks): the same arrays as h5py's own reads and
writes, files that plain h5py reads, and datasets with other filters left to h5py."""
import threading

import h5py
import numpy as np
import pytest

from unet.io.hdf5_chunks import ChunkCodec, direct_codec
from unet.io.volume_writers import create_volume
from unet.io.volumes import open_volume

SHAPE, CHUNKS = (3, 70, 90), (1, 32, 32)  # edge chunks on y and x


def _array(dtype) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random(SHAPE) * 250).astype(dtype)


@pytest.mark.parametrize("dtype, shuffle", [(np.uint8, True), (np.float32, True), (np.float32, False),
                                            (np.uint32, True), (">u2", True)])
def test_direct_writes_read_back_by_h5py_and_direct_reads_equal_h5py(tmp_path, dtype, shuffle):
    a = _array(dtype)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        ds = f.create_dataset("x", shape=SHAPE, dtype=dtype, chunks=CHUNKS, compression="gzip",
                              compression_opts=1, shuffle=shuffle, fillvalue=7)
        codec = ChunkCodec(ds, workers=3)
        codec.write((slice(0, 2), slice(0, 64), slice(0, 90)), a[:2, :64])  # chunk-aligned, edge chunks in x
        codec.close()
    with h5py.File(tmp_path / "a.h5", "r") as f:
        stored = f["x"][...]  # HDF5's own filter pipeline decodes what was written directly
        np.testing.assert_array_equal(stored[:2, :64], a[:2, :64])
        assert (stored[:2, 64:] == 7).all() and (stored[2] == 7).all()  # never written: the fill value
        codec = ChunkCodec(f["x"], workers=3)
        np.testing.assert_array_equal(codec.read((slice(None), slice(5, 69), slice(3, 88))), stored[:, 5:69, 3:88])
        np.testing.assert_array_equal(codec.read((1, slice(30, 40), slice(None))), stored[1, 30:40])
        assert codec.read((slice(0, 0), slice(None), slice(None))).shape == (0, 70, 90)
        codec.close()


def test_h5py_written_chunks_read_the_same(tmp_path):
    a = _array(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("x", data=a, chunks=CHUNKS, compression="gzip", compression_opts=4, shuffle=True)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        codec = ChunkCodec(f["x"])
        np.testing.assert_array_equal(codec.read((slice(None),) * 3), a)
        codec.close()


@pytest.mark.parametrize("filters, direct", [
    ({"compression": "gzip"}, True), ({"compression": "gzip", "shuffle": True}, True),
    ({"compression": "lzf"}, False), ({"compression": "gzip", "fletcher32": True}, False),
    ({"chunks": None}, False), ({"chunks": CHUNKS}, False),  # contiguous; chunked but not compressed
])
def test_other_filters_are_left_to_h5py(tmp_path, filters, direct):
    a = _array(np.uint8)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        ds = f.create_dataset("x", data=a, **{"chunks": CHUNKS, **filters})
        assert direct_codec(ds) is direct
    with open_volume(str(tmp_path / "a.h5/x")) as vol:  # either way the volume reads the same
        np.testing.assert_array_equal(vol.read(), a)


def test_the_volume_writer_compresses_in_threads_and_closes_them(tmp_path, monkeypatch):
    names = []
    real = ChunkCodec._encode

    def encode(self, *args):
        names.append(threading.current_thread().name)
        return real(self, *args)

    monkeypatch.setattr(ChunkCodec, "_encode", encode)
    a = _array(np.uint8)
    with create_volume(str(tmp_path / "p.h5/masks"), SHAPE, np.uint8, CHUNKS) as out:
        out.write((0, 0, 0), a)
        np.testing.assert_array_equal(out.read((1, 0, 0), (1, 70, 90)), a[1:2])  # read back through the codec
        out.commit()
    assert len(names) == 3 * 3 * 3 and all(n.startswith("unet-hdf5") for n in names)
    assert not [t for t in threading.enumerate() if t.name.startswith("unet-hdf5")]
    with h5py.File(tmp_path / "p.h5", "r") as f:
        np.testing.assert_array_equal(f["masks"][...], a)
