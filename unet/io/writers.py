"""Writers of image files, each atomic: pages go to a hidden temporary file renamed into place when complete.

Masks, probabilities and labels are plain multi-page TIFFs with zlib (deflate) compression and no ImageJ
hyperstack header, because ImageJ's own reader only handles *uncompressed* hyperstacks (it reads the first
IFD and assumes contiguous pages; tifffile's documentation: "ImageJ hyperstacks do not support BigTIFF or
compression"), whereas it opens a plain deflate-compressed multi-page TIFF as a stack (Fiji File > Open, or
Bio-Formats). ``compression="none"`` writes uncompressed pages instead. Each page is written as it
arrives, so memory never grows with the number of pages. The one exception is :class:`HyperstackWriter`
(several channels per slice, e.g. the class probabilities of a K-class model): channels need the hyperstack
header, so it writes the uncompressed hyperstack ImageJ reads.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from unet.atomic import atomic_path, publish, temporary_path, write_errors
from unet.errors import UserError

COMPRESSIONS = ("zlib", "none")
# Above this many uncompressed bytes a classic TIFF's 32-bit offsets could overflow: switch to BigTIFF.
BIGTIFF_BYTES = 3 * 2 ** 30


def label_dtype(max_label: int) -> type:
    """uint16 when every id fits (<= 65535), else uint32."""
    if max_label > np.iinfo(np.uint32).max:
        raise ValueError(f"{max_label} labels do not fit in uint32")
    return np.uint16 if max_label <= np.iinfo(np.uint16).max else np.uint32


def shift_labels(labels: np.ndarray, max_id: int, path) -> tuple[np.ndarray, int]:
    """One slice's labels (0 = membrane, 1..n = cells) with ids shifted past ``max_id``, the earlier slices' largest.

    Args:
        labels: the slice's labels, ids from 1.
        max_id: the largest id written so far.
        path: the label output, named in the error.

    Returns:
        The shifted labels as uint32, and the new largest id.

    Raises:
        UserError: the ids would pass uint32.
    """
    n = int(labels.max(initial=0))
    try:
        label_dtype(max_id + n)
    except ValueError as e:
        raise UserError(f"{path}: {e}; the stack has too many cells for one label stack") from None
    return np.where(labels > 0, labels + max_id, 0).astype(np.uint32), max_id + n


class _CommitOnExit:
    """Context manager of the atomic writers: ``commit()`` on success, ``abort()`` on any exception."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with write_errors(self.path, cleanup=self.abort):  # disk full, size limit: one line, no temporary left
            if exc is not None:
                raise exc
            self.commit()


class StackWriter(_CommitOnExit):
    """Append 2D pages to a multi-page TIFF under a temporary name; rename into place on success.

    Each page is compressed and written as it arrives (no ImageJ header, see the module docstring), so
    memory never grows with the number of pages. Use as a context manager: leaving it with an exception
    (or calling :meth:`abort`) deletes the temporary file and leaves nothing under the final name.

    Args:
        path: final file name; its folder must exist.
        expected_bytes: uncompressed size of all pages, to choose BigTIFF above 3 GiB.
        compression: ``zlib`` (deflate) or ``none``.
    """

    def __init__(self, path: str | Path, *, expected_bytes: int = 0, compression: str = COMPRESSIONS[0]):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        self.path = Path(path)
        self.tmp = temporary_path(self.path)  # UserError when the folder is missing
        self.compression = None if compression == "none" else "zlib"
        self.pages = 0
        self._tif = tifffile.TiffWriter(self.tmp, bigtiff=expected_bytes > BIGTIFF_BYTES)

    def append(self, pages: np.ndarray) -> None:
        """Write one ``(H, W)`` page or a ``(n, H, W)`` batch of pages."""
        pages = pages[None] if pages.ndim == 2 else pages
        for page in pages:
            # metadata=None: no per-page JSON header, so readers see one series of identical pages.
            self._tif.write(np.ascontiguousarray(page), compression=self.compression, metadata=None,
                            photometric="minisblack")
            self.pages += 1

    def commit(self) -> Path:
        """Close, flush to disk and rename to the final name."""
        self._tif.close()
        publish(self.tmp, self.path)
        return self.path

    def close(self) -> None:
        """Close the temporary file without publishing it (:meth:`abort` deletes it later)."""
        self._tif.close()

    def abort(self) -> None:
        """Close and delete the temporary file."""
        with contextlib.suppress(Exception):
            self._tif.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


class HyperstackWriter(StackWriter):
    """Append ``(C, H, W)`` slices to an ImageJ hyperstack (axes ZCYX) under a temporary name; atomic like
    :class:`StackWriter`. Fiji's *File > Open* shows the channels (e.g. one per class) with a C slider.

    Uncompressed, whatever ``--compression`` says: ImageJ's reader takes a hyperstack's pixels as one block
    after the first page (tifffile: "ImageJ hyperstacks do not support BigTIFF or compression"), and tifffile
    streams such a series slice by slice only in its contiguous, uncompressed mode. Each slice is written as it
    arrives; the header (``images``, ``channels``, ``slices``) and the page directory follow at :meth:`commit`.
    Past 4 GB tifffile keeps only the first page's directory, the ImageJ layout for such files (not tested here).

    Args:
        path: final file name; its folder must exist.
    """

    def __init__(self, path: str | Path):
        # StackWriter's fields, but an ImageJ TiffWriter: no BigTIFF or compression to choose (see above).
        self.path = Path(path)
        self.tmp = temporary_path(self.path)
        self.pages = 0
        self._tif = tifffile.TiffWriter(self.tmp, imagej=True)

    def append(self, slices: np.ndarray) -> None:
        """Write one ``(C, H, W)`` slice or a ``(n, C, H, W)`` batch (``pages`` counts slices)."""
        slices = slices[None] if slices.ndim == 3 else slices
        for channels in slices:
            # contiguous: the slice extends the first write's series, whose shape the header gives at close.
            self._tif.write(np.ascontiguousarray(channels), contiguous=True, photometric="minisblack")
            self.pages += 1


class LabelStackWriter(_CommitOnExit):
    """Instance label pages with ids running on through the stack, written as uint16 or uint32 as needed.

    The largest id is known only after the last page, so pages go to a hidden uint32 TIFF as they come.
    :meth:`commit` renames that file when an id passed 65535, else rewrites it page by page (one page in
    memory) as uint16 under the final name: the dtype is always the one :func:`label_dtype`
    gives for the stack's largest id, never a guess. Atomic like :class:`StackWriter`.

    Args:
        path: final file name; its folder must exist.
        pixels: pixels of the whole stack (chooses BigTIFF).
        compression: ``zlib`` or ``none``.
    """

    def __init__(self, path: str | Path, *, pixels: int = 0, compression: str = COMPRESSIONS[0]):
        self.path, self.pixels, self.compression = Path(path), pixels, compression
        self.max_id = 0
        self._wide = StackWriter(self.path, expected_bytes=pixels * 4, compression=compression)

    def append(self, labels: np.ndarray) -> None:
        """Add one slice's labels (0 = membrane, 1..n = cells); its ids are shifted past the earlier slices'."""
        shifted, self.max_id = shift_labels(labels, self.max_id, self.path)
        self._wide.append(shifted)

    def commit(self) -> Path:
        """Rename (uint32) or narrow to uint16 and rename; the hidden uint32 file is gone afterwards."""
        if label_dtype(self.max_id) == np.uint32:
            return self._wide.commit()
        self._wide.close()
        try:
            with StackWriter(self.path, expected_bytes=self.pixels * 2, compression=self.compression) as narrow, \
                    tifffile.TiffFile(self._wide.tmp) as wide:
                for page in wide.pages:
                    narrow.append(page.asarray().astype(np.uint16))
        finally:
            self._wide.abort()
        return self.path

    def abort(self) -> None:
        self._wide.abort()


def write_png_atomic(path: Path, rgb: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 picture as a PNG under a temporary name, renamed when complete."""
    with atomic_path(path) as tmp:
        Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG")
