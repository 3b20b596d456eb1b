"""One opened array, whatever its format: shape, dtype, chunks, axis names and a reader of regions.

Every format module (:mod:`unet.io.containers`, :mod:`unet.io.tiff_volumes`) hands back an :class:`ArraySource`;
:mod:`unet.io.volumes` turns it into the (Z, [C,] Y, X) view. Keeping the format-specific part to a few
callables means region reads, axis handling and error messages are written once for all formats.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from unet.errors import UserError

# Axis names a volume may have (OME-NGFF's usual names); anything else is refused rather than guessed.
KNOWN_AXES = "tczyx"


@dataclass
class ArraySource:
    """A lazily read array in its stored axis order.

    Args:
        name: the volume path as the user wrote it (for messages).
        shape, dtype, chunks: the stored array's geometry; ``chunks`` is the unit the format reads and decodes.
        axes: one letter per dimension from the file's own metadata (OME-NGFF axes, zarr v3 dimension names,
            HDF5 dimension labels), or None when the file says nothing.
        read: native index (a tuple of ints and unit-step slices, one per dimension) -> numpy array.
        chunk_name: native chunk-grid coordinates -> how the chunk is named in messages (its key or file).
        close: releases the file handles.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    axes: str | None
    read: Callable[[tuple], np.ndarray]
    chunk_name: Callable[[tuple[int, ...]], str] = lambda coords: f"chunk {tuple(coords)}"
    close: Callable[[], None] = lambda: None


def axes_from_names(names, source: str) -> str | None:
    """Axis names from metadata (e.g. ``["z", "y", "x"]``) as a lower-case letter string; None if unnamed.

    Raises:
        UserError: a name that is not one of t, c, z, y, x (naming it and the file).
    """
    names = [str(n).strip().lower() if n is not None else "" for n in names]
    if not any(names):
        return None
    unknown = [n for n in names if n not in KNOWN_AXES or len(n) != 1]
    if unknown:
        raise UserError(f"{source}: unknown axis name(s) {unknown} in the axes {names}; only t, c, z, y, x are "
                        f"supported, rename the axes in the file's metadata")
    return "".join(names)


def _chunk_ranges(index: tuple, shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[range]:
    """For each dimension, the chunk-grid coordinates the native ``index`` touches."""
    ranges = []
    for item, size, chunk in zip(index, shape, chunks):
        if isinstance(item, slice):
            start, stop, _ = item.indices(size)
            ranges.append(range(start // chunk, -(-stop // chunk)) if stop > start else range(0))
        else:
            ranges.append(range(item // chunk, item // chunk + 1))
    return ranges


def _chunk_index(coords: tuple[int, ...], index: tuple, shape, chunks) -> tuple:
    """The part of ``index`` that lies in chunk ``coords``."""
    out = []
    for c, item, size, chunk in zip(coords, index, shape, chunks):
        if isinstance(item, slice):
            start, stop, _ = item.indices(size)
            out.append(slice(max(start, c * chunk), min(stop, (c + 1) * chunk)))
        else:
            out.append(item)
    return tuple(out)


def read_region(source: ArraySource, index: tuple) -> np.ndarray:
    """``source.read(index)``; a read that fails on bad data becomes a UserError naming the broken chunk.

    The failing read is repeated chunk by chunk to find the first chunk that cannot be decoded (a truncated
    or corrupt file); if every chunk reads on its own the original error is raised unchanged (a bug, not data).
    """
    try:
        return source.read(index)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - codecs raise anything; re-raised below unless a chunk is to blame
        original = exc
    for coords in itertools.product(*_chunk_ranges(index, source.shape, source.chunks)):
        try:
            source.read(_chunk_index(coords, index, source.shape, source.chunks))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise UserError(f"{source.name}: {source.chunk_name(coords)} cannot be read ({reason}); the chunk is "
                            f"truncated or corrupt, copy or write the volume again") from exc
    raise original
