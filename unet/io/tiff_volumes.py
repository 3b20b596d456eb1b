"""TIFF stacks and PNG images as lazily read volumes.

TIFF: the header is checked by :func:`unet.io.images.stack_info` (truncated files, several series, empty
stacks are refused there, with the same messages as everywhere else). Pixels are then read per region:

* uncompressed, contiguous series are memory-mapped (``tifffile.memmap``): a window reads only its bytes;
* anything else goes through tifffile's zarr interface (``series.aszarr()``), whose chunks are the TIFF's
  strips or tiles: a window of a page larger than memory decodes only the strips/tiles it covers.

Slices follow :func:`unet.io.images.read_stack`: all non-channel leading axes (T, Z, ...) are flattened into
Z in file order; RGB samples or a hyperstack channel axis become C. PNG images are small and read whole.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import zarr

from unet.io.images import read_stack, stack_info
from unet.io.paths import VolumePath
from unet.io.sources import ArraySource


def open_png(vp: VolumePath) -> ArraySource:
    """A PNG image as a one-slice volume, read whole (PNG has no random access)."""
    data = read_stack(vp.container)
    axes = "zcyx" if data.ndim == 4 else "zyx"
    return ArraySource(str(vp), data.shape, data.dtype, data.shape, axes, read=lambda index: data[index])


def _series_array(path: Path):
    """(array, zarr store or None, axes) of the first series: a memory map when its pixels are stored plainly
    (one contiguous uncompressed block), else tifffile's zarr view."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, plain = series.axes, series.dataoffset is not None
    if plain:
        return tifffile.memmap(path, series=0, mode="r"), None, axes
    store = tifffile.imread(path, aszarr=True, series=0, level=0)
    return zarr.open(store=store, mode="r"), store, axes


def _plane_mapper(axes: str, shape: tuple[int, ...], channels: int):
    """Native index for slice ``z`` (an int), channel index ``c`` and window ``ys``, ``xs``."""
    channel_axis = "S" if "S" in axes else ("C" if channels > 1 else None)
    slice_axes = [k for k, a in enumerate(axes) if a not in "YXS" and a != channel_axis]
    slice_shape = [shape[k] for k in slice_axes]

    def native(z: int, c, ys: slice, xs: slice) -> tuple:
        pos = dict(zip(slice_axes, np.unravel_index(z, slice_shape))) if slice_axes else {}
        index = []
        for k, a in enumerate(axes):
            index.append(ys if a == "Y" else xs if a == "X" else c if a == channel_axis else int(pos[k]))
        return tuple(index)

    # After indexing, the kept axes are the channel axis (if any), Y, X in file order; order as C, Y, X.
    kept = [a for a in axes if a in "YX" or a == channel_axis]
    order = [kept.index(a) for a in ([channel_axis] if channel_axis else []) + ["Y", "X"]]
    return native, order


def open_tiff(vp: VolumePath) -> ArraySource:
    """A TIFF stack as a ``(Z, Y, X)`` or ``(Z, C, Y, X)`` source whose reads touch only the pages needed.

    Raises:
        UserError: as :func:`unet.io.images.stack_info` (missing, truncated or unsupported files).
    """
    info = stack_info(vp.container)
    arr, store, axes = _series_array(vp.container)
    native, order = _plane_mapper(axes, tuple(arr.shape), info.channels)
    multi = info.channels > 1
    shape = (info.num_slices,) + ((info.channels,) if multi else ()) + (info.height, info.width)
    native_chunks = getattr(arr, "chunks", None)
    # A memory map has no chunks; a zarr view's chunks are the TIFF strips or tiles.
    yx_chunks = tuple(native_chunks[axes.index(a)] for a in "YX") if native_chunks else (info.height, info.width)
    chunks = (1,) + ((info.channels,) if multi else ()) + yx_chunks

    def read(index: tuple) -> np.ndarray:
        zs, ys, xs = index[0], index[-2], index[-1]
        c = index[1] if multi else slice(None)
        planes = []
        for z in range(*zs.indices(info.num_slices)) if isinstance(zs, slice) else [zs]:
            plane = np.asarray(arr[native(z, c, ys, xs)])
            plane = np.transpose(plane, order) if plane.ndim == len(order) else plane
            planes.append(plane)
        out = np.stack(planes) if planes else np.zeros((0,) + _window_shape(index, shape)[1:], info.dtype)
        return out if isinstance(zs, slice) else out[0]

    def close() -> None:
        if store is not None:
            store.close()

    return ArraySource(str(vp), shape, np.dtype(info.dtype), chunks, "zcyx" if multi else "zyx", read=read,
                       chunk_name=lambda coords: f"slice {coords[0]} tile/strip {tuple(coords[1:])}", close=close)


def _window_shape(index: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(len(range(*i.indices(n))) for i, n in zip(index, shape) if isinstance(i, slice))

