"""Chunked, compressed output volumes (OME-Zarr, HDF5), written block by block at chunk-aligned regions.

Design against half-written outputs: **temporary name, rename on completion.** :func:`create_volume` builds the
whole container under ``<container>.partial`` (``seg.ome.zarr.partial``, ``pred.h5.partial``), a name no
reader takes for a finished volume (napari, ome-zarr and this package pick formats by the ``.zarr`` / ``.h5``
suffix); :meth:`VolumeWriter.commit` renames it to the final name once every block is written. A killed run
leaves only the ``.partial`` container; the final path either does not exist or still holds the previous,
complete output (``overwrite=True`` replaces it only at commit).

Writes must be chunk-aligned (each block starts on a chunk boundary and ends on one or at the volume's edge),
so processes writing disjoint blocks never touch the same chunk. For zarr this makes parallel writers safe:
one process calls :func:`create_volume` and later :meth:`~VolumeWriter.commit`, the others
:func:`open_partial_volume` and write their blocks. **HDF5 is not safe for parallel writers** (one file, one
writer): the HDF5 writer holds an exclusive lock (``<container>.partial.lock``, ``fcntl.flock``, released
when the process ends, even by SIGKILL) and a second writer, in this process or another, is refused.

Formats follow the path (:mod:`unet.io.paths`): ``.zarr`` -> OME-Zarr image (v0.4 in a zarr v2 store by
default, the version most viewers read; ``zarr_format=3`` writes v0.5), level 0 only, Blosc-zstd compressed
(level 1: fast), at the key (the store's root when none); ``.h5`` -> an HDF5 dataset at the key (``data`` when
none), gzip level 1 (4096^2 masks: 87 ms against level 4's 122 ms, 1.85 against 1.32 MiB), its chunks
compressed by a thread pool (:mod:`unet.io.hdf5_chunks`).
Axis order in memory is ``zyx`` or ``zcyx``; both formats store ``zcyx`` as ``czyx`` (OME-NGFF puts channels
before space; HDF5 follows, so that a channel's volume is one contiguous block as in the zarr), and HDF5
datasets get dimension labels, so :func:`unet.io.volumes.open_volume` reads both back in the writer's order.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from unet.atomic import write_error
from unet.errors import UserError
from unet.io.hdf5_chunks import ChunkCodec, direct_codec
from unet.io.ome import ome_attributes, ome_level
from unet.io.paths import VolumePath, parse_volume_path

PARTIAL_SUFFIX = ".partial"
DEFAULT_CHUNK_YX = 512  # 512 x 512 slices: 256 KB per uint8 chunk, one chunk per tile row of a typical plan
DEFAULT_HDF5_KEY = "data"
OME_LEVEL0 = "0"


def partial_path(container: Path) -> Path:
    """Where a container is written before it is renamed to ``container``."""
    return container.with_name(container.name + PARTIAL_SUFFIX)


@dataclass
class VolumeWriter:
    """An output volume being written; see the module docstring.

    Args:
        path: the final volume path.
        shape, dtype, chunks: in ``axes`` order.
        axes: ``"zyx"`` or ``"zcyx"``.
        store: (stored-order index, stored-order block) -> writes it.
        release: closes files and locks.
        stored_axes: the axis order on disk (``czyx`` for a ``zcyx`` volume, else ``axes``).
        sync: hands buffered writes to the operating system (HDF5), or None.
        load: (stored-order index) -> the stored region, for :meth:`read`.
    """

    path: VolumePath
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    axes: str
    store: Callable[[tuple, np.ndarray], None]
    release: Callable[[], None]
    stored_axes: str
    closed: bool = False
    sync: Callable[[], None] | None = None
    load: Callable[[tuple], np.ndarray] | None = None

    def flush(self) -> None:
        """Hand what was written to the operating system (HDF5 keeps chunks in its own cache until then), so that
        a killed process loses none of it; zarr writes each chunk's file at once.

        Raises:
            UserError: the disk refused the write, naming the volume.
        """
        if self.sync is not None:
            try:
                self.sync()
            except OSError as exc:
                raise write_error(self.path, exc) from None

    def write(self, start: tuple[int, ...], block: np.ndarray) -> None:
        """Write ``block`` (``axes`` order) at ``start``; both ends must lie on chunk boundaries or the volume's edge.

        Raises:
            ValueError: misaligned, out of bounds or of a dtype that does not cast safely.
            UserError: the disk refused the write (full, read-only), naming the volume.
        """
        if len(start) != len(self.shape) or block.ndim != len(self.shape):
            raise ValueError(f"block of {block.ndim} dims at {start} for a volume with axes {self.axes!r}")
        if not np.can_cast(block.dtype, self.dtype, casting="safe"):
            raise ValueError(f"block dtype {block.dtype} does not fit the volume's {self.dtype}")
        for s0, n, size, chunk in zip(start, block.shape, self.shape, self.chunks):
            stop = s0 + n
            if s0 < 0 or stop > size or s0 % chunk or (stop % chunk and stop != size):
                raise ValueError(f"block at {tuple(start)} of shape {block.shape} is not chunk-aligned "
                                 f"(chunks {self.chunks}, shape {self.shape})")
        perm = [self.axes.index(a) for a in self.stored_axes]
        index = tuple(slice(start[k], start[k] + block.shape[k]) for k in perm)
        try:
            self.store(index, np.transpose(block, perm).astype(self.dtype, copy=False))
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def read(self, start: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
        """Read back a region (``axes`` order, any alignment) of what was written: a later pass of a block-wise run
        reads its own earlier output through the writer that holds the file (HDF5's lock admits no second opener)."""
        perm = [self.axes.index(a) for a in self.stored_axes]
        index = tuple(slice(start[k], start[k] + shape[k]) for k in perm)
        return np.transpose(self.load(index), np.argsort(perm))

    def close(self) -> None:
        """Release files and locks without committing (the ``.partial`` container stays for a resume)."""
        if not self.closed:
            self.closed = True
            self.release()

    def commit(self) -> None:
        """Close and rename ``<container>.partial`` to the final name (replacing an old output there)."""
        self.close()
        final, tmp = self.path.container, partial_path(self.path.container)
        try:
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as exc:
            raise write_error(final, exc) from None

    def __enter__(self) -> "VolumeWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------- axes

def _stored_axes(axes: str) -> str:
    return "czyx" if axes == "zcyx" else axes


def _memory_axes(stored: str) -> str:
    return "zcyx" if stored == "czyx" else stored


def _in_memory_order(stored_shape: tuple, stored: str, axes: str) -> tuple:
    """A shape (or chunk shape) given in ``stored`` axis order, in ``axes`` order."""
    return tuple(stored_shape[stored.index(a)] for a in axes)


# ----------------------------------------------------------------------------------------------- OME-Zarr

def _zarr_writer(vp: VolumePath, arr: zarr.Array, axes: str) -> VolumeWriter:
    def store(index, block):
        arr[index] = block

    stored = _stored_axes(axes)
    return VolumeWriter(vp, _in_memory_order(arr.shape, stored, axes), np.dtype(arr.dtype),
                        _in_memory_order(arr.chunks, stored, axes), axes, store, release=lambda: None,
                        stored_axes=stored,
                        load=arr.__getitem__)


def _create_zarr(vp: VolumePath, tmp: Path, shape, dtype, chunks, axes: str, zarr_format: int,
                 voxel_size) -> VolumeWriter:
    stored = _stored_axes(axes)
    perm = [axes.index(a) for a in stored]
    root = zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format)
    group = root.require_group(vp.key) if vp.key else root
    # zstd level 1, not 5: on EM slices and uint8 masks it writes 2.5-3.6x faster for 0-33 % more bytes (measured
    # on 4096^2 blocks: a mask 56 ms / 1.6 MiB against 204 ms / 1.2 MiB; raw EM 14.4 against 14.3 MiB), and at
    # level 5 writing the masks alone took a tenth of block-wise prediction's time on a 2-core CPU.
    if zarr_format == 2:
        codec = {"compressors": numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE),
                 "chunk_key_encoding": {"name": "v2", "separator": "/"}}  # "/" as OME-NGFF 0.4 asks
    else:
        codec = {"compressors": BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
                 "dimension_names": list(stored)}
    arr = group.create_array(OME_LEVEL0, shape=tuple(shape[k] for k in perm), chunks=tuple(chunks[k] for k in perm),
                             dtype=dtype, fill_value=0, **codec)
    group.attrs.update(ome_attributes(stored, OME_LEVEL0, "0.4" if zarr_format == 2 else "0.5",
                                      name=vp.key or vp.container.name.split(".")[0], voxel_size=voxel_size))
    return _zarr_writer(vp, arr, axes)


# --------------------------------------------------------------------------------------------------- HDF5

def _lock(vp: VolumePath, tmp: Path) -> int:
    """An exclusive lock on ``<tmp>.lock``, or a UserError saying another writer holds it."""
    lock = tmp.with_name(tmp.name + ".lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The holder unlinks the lock file on release; a lock won on such an unlinked file would not exclude
        # a writer that makes a new one, so it counts as held by someone else.
        if os.fstat(fd).st_ino != os.stat(lock).st_ino:
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise UserError(f"{vp}: is being written by another writer (lock {lock}); HDF5 files cannot be written "
                        f"by several processes at once, write OME-Zarr (.zarr) for parallel runs") from None
    return fd


def _unlock(tmp: Path, fd: int) -> None:
    # Unlink before unlocking: a writer waiting on the old lock file then finds it gone and makes a new one.
    lock = tmp.with_name(tmp.name + ".lock")
    if lock.exists():
        lock.unlink()
    os.close(fd)


def _hdf5_writer(vp: VolumePath, tmp: Path, fd: int, f: h5py.File, ds: h5py.Dataset, axes: str) -> VolumeWriter:
    # Our datasets are gzip (+ shuffle): their chunks are compressed on every core (unet.io.hdf5_chunks), and read
    # back the same way, so that HDF5's chunk cache never holds a chunk that a direct write has replaced.
    codec = ChunkCodec(ds) if direct_codec(ds) else None

    def store(index, block):
        if codec is None:
            ds[index] = block
        else:
            codec.write(index, block)

    def release():
        if codec is not None:
            codec.close()
        f.close()
        _unlock(tmp, fd)

    stored = "".join(d.label for d in ds.dims)  # the file's own order, whichever version wrote it
    return VolumeWriter(vp, _in_memory_order(ds.shape, stored, axes), np.dtype(ds.dtype),
                        _in_memory_order(ds.chunks, stored, axes), axes, store, release, stored, sync=f.flush,
                        load=ds.__getitem__ if codec is None else codec.read)


def _create_hdf5(vp: VolumePath, tmp: Path, shape, dtype, chunks, axes: str) -> VolumeWriter:
    stored = _stored_axes(axes)
    perm = [axes.index(a) for a in stored]
    fd = _lock(vp, tmp)
    try:
        f = h5py.File(tmp, "w")
        ds = f.create_dataset(vp.key or DEFAULT_HDF5_KEY, shape=tuple(shape[k] for k in perm), dtype=dtype,
                              chunks=tuple(chunks[k] for k in perm), compression="gzip", compression_opts=1,
                              shuffle=True, fillvalue=0)
        for k, a in enumerate(stored):
            ds.dims[k].label = a
    except BaseException:
        _unlock(tmp, fd)
        raise
    return _hdf5_writer(vp, tmp, fd, f, ds, axes)


# ------------------------------------------------------------------------------------------------ public

def default_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One slice by up to 512 x 512 pixels (all channels together)."""
    return (1,) + tuple(shape[1:-2]) + tuple(min(DEFAULT_CHUNK_YX, n) for n in shape[-2:])


def _check_target(vp: VolumePath, overwrite: bool) -> Path:
    if vp.kind not in ("zarr", "hdf5"):
        raise UserError(f"{vp}: chunked outputs are OME-Zarr (.zarr) or HDF5 (.h5); give such a path")
    if not vp.container.parent.is_dir():
        raise UserError(f"cannot write {vp}: folder {vp.container.parent} does not exist")
    if vp.container.exists() and not overwrite:
        raise UserError(f"{vp.container}: exists; choose another output or allow overwriting it")
    return partial_path(vp.container)


def create_volume(spec: str, shape: tuple[int, ...], dtype, chunks: tuple[int, ...] | None = None, *,
                  overwrite: bool = False, zarr_format: int = 2,
                  voxel_size: tuple[float, float, float] | None = None) -> VolumeWriter:
    """Start a new chunked output volume under ``<container>.partial`` (see the module docstring).

    Args:
        spec: the final volume path, e.g. ``pred.ome.zarr``, ``out.zarr/probabilities``, ``pred.h5/mask``.
        shape: ``(Z, Y, X)`` or ``(Z, C, Y, X)``.
        dtype: pixel type, e.g. ``np.uint8`` or ``np.float32``.
        chunks: chunk shape in the same order; default :func:`default_chunks`.
        overwrite: replace an existing output at commit instead of refusing it now.
        zarr_format: 2 (OME-NGFF 0.4) or 3 (OME-NGFF 0.5), for ``.zarr`` outputs.
        voxel_size: physical (z, y, x) size for the OME-Zarr scale transform (default 1, 1, 1).

    Returns:
        A :class:`VolumeWriter`; call ``commit()`` once every block is written.

    Raises:
        UserError: unsupported or existing output, missing folder, another HDF5 writer, a failed write.
    """
    vp = parse_volume_path(spec)
    tmp = _check_target(vp, overwrite)
    if len(shape) not in (3, 4):
        raise ValueError(f"shape {shape} must be (Z, Y, X) or (Z, C, Y, X)")
    axes = "zyx" if len(shape) == 3 else "zcyx"
    chunks = tuple(chunks) if chunks is not None else default_chunks(tuple(shape))
    if len(chunks) != len(shape) or any(c < 1 for c in chunks):
        raise ValueError(f"chunks {chunks} do not fit shape {shape}")
    try:
        if vp.kind == "hdf5":
            return _create_hdf5(vp, tmp, tuple(shape), np.dtype(dtype), chunks, axes)
        if tmp.is_dir():  # a dead run's leftover: never complete, so never worth keeping over a fresh start
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
        return _create_zarr(vp, tmp, tuple(shape), np.dtype(dtype), chunks, axes, zarr_format, voxel_size)
    except OSError as exc:
        raise write_error(vp, exc) from None


def open_partial_volume(spec: str) -> VolumeWriter:
    """Join the writing of an output that :func:`create_volume` started (another process, or a resume).

    Raises:
        UserError: no ``.partial`` container, or (HDF5) another writer holds it.
    """
    vp = parse_volume_path(spec)
    tmp = partial_path(vp.container)
    if not tmp.exists():
        raise UserError(f"{vp}: no unfinished output ({tmp} does not exist); create the volume first")
    if vp.kind == "hdf5":
        fd = _lock(vp, tmp)
        try:
            f = h5py.File(tmp, "r+")
            ds = f[vp.key or DEFAULT_HDF5_KEY]
            axes = _memory_axes("".join(d.label for d in ds.dims))
        except BaseException:
            _unlock(tmp, fd)
            raise
        return _hdf5_writer(vp, tmp, fd, f, ds, axes)
    group = zarr.open_group(str(tmp), path=vp.key, mode="r+")
    level = ome_level(group.attrs.asdict(), 0, str(vp))
    axes = _memory_axes(level.axes)
    return _zarr_writer(vp, group[level.path], axes)
