"""Slice-by-slice outputs in chunked volumes (OME-Zarr, HDF5): the chunked counterpart of the TIFF page writers.

infer.py predicts a stack slice by slice; :class:`VolumeStackWriter` appends those slices to a volume made by
:func:`unet.io.volume_writers.create_volume` whose chunks are one slice deep, so every slice written is a whole
row of chunks (chunk-aligned, as the volume writer requires). Like the TIFF writers it commits on success and
aborts on any exception: the volume is built under ``<container>.partial`` and renamed only when every slice
is in; an aborted run removes the ``.partial`` (there is no resume yet), so nothing is left half-written.

Instance labels go to chunked stores as uint32 always: the largest id is known only at the end, and narrowing
a chunked volume afterwards would mean writing it twice (the TIFF label writer does that, page by page).
"""
from __future__ import annotations

import contextlib
import shutil

import numpy as np

from unet.io.paths import parse_volume_path
from unet.io.volume_writers import DEFAULT_CHUNK_YX, create_volume, partial_path
from unet.io.writers import shift_labels

DEFAULT_CHUNKS = (DEFAULT_CHUNK_YX, DEFAULT_CHUNK_YX)


def chunk_yx(text: str) -> tuple[int, int]:
    """A y/x chunk shape: ``512`` (square) or ``256x512`` (height x width), each at least 1.

    Raises:
        ValueError: with the message the user sees.
    """
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"must be N or HxW in pixels, e.g. 512 or 256x512, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"must be N or HxW of whole numbers >= 1, e.g. 512 or 256x512, got {text!r}")
    return (values[0], values[-1])


class VolumeStackWriter:
    """Append ``(H, W)`` pages to a new ``(Z, H, W)`` chunked volume, or ``(C, H, W)`` slices to a ``(Z, C, H, W)``
    one (a K-class model's probabilities; stored as OME-NGFF's ``czyx``, see :func:`create_volume`); commit on
    success, abort on exceptions.

    Args:
        spec: the final volume path (``out.zarr``, ``out.zarr/masks``, ``out.h5/masks``, ``out.h5``).
        shape: ``(Z, H, W)`` or ``(Z, C, H, W)``.
        dtype: the stored pixel type.
        chunk_yx: y/x chunk shape (clamped to the slice); chunks are one slice (and one channel) deep.
        overwrite: replace an existing output at commit instead of refusing it.
    """

    def __init__(self, spec: str, shape: tuple[int, ...], dtype, chunk_yx: tuple[int, int] = DEFAULT_CHUNKS, *,
                 overwrite: bool = False):
        chunks = (1,) * (len(shape) - 2) + tuple(min(c, n) for c, n in zip(chunk_yx, shape[-2:]))
        self.path = parse_volume_path(spec)
        self.writer = create_volume(spec, shape, dtype, chunks, overwrite=overwrite)
        self.pages = 0

    def append(self, pages: np.ndarray) -> None:
        """Write one slice (``(H, W)``, or ``(C, H, W)`` with channels) or a batch of them at the next slice(s)."""
        pages = pages[None] if pages.ndim == len(self.writer.shape) - 1 else pages
        if self.pages + len(pages) > self.writer.shape[0]:
            raise ValueError(f"{self.path}: more than {self.writer.shape[0]} slices appended")
        self.writer.write((self.pages,) + (0,) * (pages.ndim - 1), np.ascontiguousarray(pages))
        self.pages += len(pages)

    def commit(self) -> None:
        """Rename the finished volume to its final name (every slice must be in)."""
        if self.pages != self.writer.shape[0]:
            raise ValueError(f"{self.path}: {self.pages} of {self.writer.shape[0]} slices written")
        self.writer.commit()

    def abort(self) -> None:
        """Close and delete the ``.partial`` container."""
        with contextlib.suppress(Exception):
            self.writer.close()
        tmp = partial_path(self.path.container)
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()

    def __enter__(self) -> "VolumeStackWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise


class LabelVolumeStackWriter(VolumeStackWriter):
    """Instance label pages, ids running on through the stack (as :class:`unet.io.writers.LabelStackWriter`),
    stored as uint32."""

    def __init__(self, spec: str, shape: tuple[int, int, int], chunk_yx: tuple[int, int] = DEFAULT_CHUNKS, *,
                 overwrite: bool = False):
        super().__init__(spec, shape, np.uint32, chunk_yx, overwrite=overwrite)
        self.max_id = 0

    def append(self, labels: np.ndarray) -> None:
        """Add one slice's labels (0 = membrane, 1..n = cells); its ids are shifted past the earlier slices'."""
        shifted, self.max_id = shift_labels(labels, self.max_id, self.path)
        super().append(shifted)
