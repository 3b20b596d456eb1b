"""HDF5 chunks compressed and decompressed by a pool of threads, for gzip (and shuffle) datasets.

Why not h5py's own reads and writes: h5py holds Python's global lock while HDF5 runs its filter pipeline, one
chunk after another in one thread, so an HDF5 volume decodes on one core however many there are, and a reader
and a writer thread take turns instead of overlapping (docs/inference.md measured HDF5 at 39 Mpx/s on a GPU
host where OME-Zarr, whose codecs run in threads, did 181). HDF5's direct chunk I/O (``H5Dread_chunk`` /
``H5Dwrite_chunk``, h5py's ``DatasetID.read_direct_chunk`` / ``write_direct_chunk``) hands over the stored bytes;
:mod:`zlib` releases the global lock while it works, so chunks are (de)compressed side by side. The bytes are
what HDF5's own deflate filter stores (zlib streams, after the byte shuffle when the dataset has it), so any
HDF5 reader opens the files, and this reader opens theirs. Datasets with any other filter (lzf, Blosc,
checksums, scale-offset) or no chunks go through h5py as before (:func:`direct_codec` says which).
"""
from __future__ import annotations

import itertools
import zlib
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

from unet.cpus import usable_cpus

__all__ = ["direct_codec", "ChunkCodec"]

_SHUFFLE, _DEFLATE = h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE


def direct_codec(ds: h5py.Dataset) -> bool:
    """Whether the dataset's chunks can be (de)compressed here: chunked, deflate last, shuffle at most before it."""
    if ds.chunks is None:
        return False
    plist = ds.id.get_create_plist()
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    return filters in ([_DEFLATE], [_SHUFFLE, _DEFLATE])


class ChunkCodec:
    """Reads and writes regions of a :func:`direct_codec` dataset, chunk by chunk in a thread pool.

    Args:
        ds: the dataset (gzip, optionally shuffled).
        workers: threads (default: the usable cores).
    """

    def __init__(self, ds: h5py.Dataset, workers: int | None = None):
        if not direct_codec(ds):
            raise ValueError(f"{ds.name}: only chunked gzip (+ shuffle) datasets are (de)compressed here")
        self.ds = ds
        self.dtype = np.dtype(ds.dtype)
        self.chunks = tuple(ds.chunks)
        self.shuffle = bool(ds.shuffle) and self.dtype.itemsize > 1  # a 1-byte shuffle moves nothing
        self.level = int(ds.compression_opts or 4)
        self.fill = np.zeros((), self.dtype) if ds.fillvalue is None else np.asarray(ds.fillvalue, self.dtype)
        self.pool = ThreadPoolExecutor(max_workers=workers or usable_cpus(), thread_name_prefix="unet-hdf5")

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _chunk_origins(self, box: tuple[slice, ...]):
        ranges = [range(s.start - s.start % c, s.stop, c) for s, c in zip(box, self.chunks)]
        return itertools.product(*ranges)

    def read(self, index: tuple) -> np.ndarray:
        """``ds[index]`` for an index of ints and unit-step slices (as :class:`~unet.io.sources.ArraySource`)."""
        box = []
        for i, n in zip(index, self.ds.shape):
            if isinstance(i, slice):
                start, stop, _ = i.indices(n)
                box.append(slice(start, max(start, stop)))
            else:
                box.append(slice(int(i), int(i) + 1))
        box = tuple(box)
        out = np.empty(tuple(s.stop - s.start for s in box), self.dtype)
        if out.size:
            list(self.pool.map(lambda origin: self._read_into(origin, box, out), self._chunk_origins(box)))
        return out[tuple(slice(None) if isinstance(i, slice) else 0 for i in index)]

    def _read_into(self, origin: tuple[int, ...], box: tuple[slice, ...], out: np.ndarray) -> None:
        chunk = self._decode(origin)
        src = tuple(slice(max(s.start, o) - o, min(s.stop, o + c) - o) for s, o, c in zip(box, origin, self.chunks))
        dst = tuple(slice(max(s.start, o) - s.start, min(s.stop, o + c) - s.start)
                    for s, o, c in zip(box, origin, self.chunks))
        out[dst] = chunk if chunk.ndim == 0 else chunk[src]

    def _decode(self, origin: tuple[int, ...]) -> np.ndarray:
        """One stored chunk, full size; the fill value (a 0-d array) where the chunk was never written."""
        try:
            mask, raw = self.ds.id.read_direct_chunk(origin)
        except RuntimeError:  # h5py says "chunk storage is not allocated" so; ask HDF5 itself before trusting it
            if self.ds.id.get_chunk_info_by_coord(origin).byte_offset is None:
                return self.fill
            raise
        # Bit k of the filter mask set: filter k of the pipeline (shuffle, deflate) was skipped for this chunk.
        shuffled = bool(self.ds.shuffle)
        if not mask & (1 << int(shuffled)):
            raw = zlib.decompress(raw)
        data = np.frombuffer(raw, np.uint8)
        if self.shuffle and not mask & 1:
            data = np.ascontiguousarray(data.reshape(self.dtype.itemsize, -1).T)
        return data.view(self.dtype).reshape(self.chunks)

    def write(self, index: tuple[slice, ...], block: np.ndarray) -> None:
        """``ds[index] = block`` for a chunk-aligned region (its ends on chunk boundaries or the dataset's edge)."""
        box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, self.ds.shape))
        encoded = self.pool.map(lambda origin: (origin, self._encode(origin, box, block)), self._chunk_origins(box))
        for origin, raw in encoded:  # in the calling thread: h5py's calls are serialised anyway
            self.ds.id.write_direct_chunk(origin, raw)

    def _encode(self, origin: tuple[int, ...], box: tuple[slice, ...], block: np.ndarray) -> bytes:
        part = block[tuple(slice(o - s.start, min(o + c, s.stop) - s.start) for s, o, c in zip(box, origin, self.chunks))]
        if part.shape != self.chunks:  # an edge chunk is stored full size, padded with the fill value
            full = np.full(self.chunks, self.fill, self.dtype)
            full[tuple(slice(0, n) for n in part.shape)] = part
            part = full
        data = np.ascontiguousarray(part, self.dtype)
        if self.shuffle:
            data = np.ascontiguousarray(data.view(np.uint8).reshape(-1, self.dtype.itemsize).T)
        return zlib.compress(data, self.level)
