"""Reading image stacks (TIFF, PNG): headers, pages, whole stacks, dtype scaling.

Every problem with the user's files becomes a :class:`~unet.errors.UserError` with a one-line message
that names the file, says what is wrong and what to do.

Axis convention: ``read_stack`` returns ``(N, H, W)`` for single-channel data and ``(N, C, H, W)`` when
pixels have several samples (RGB) or an ImageJ/OME hyperstack has a channel axis next to a Z/T axis.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from unet.errors import UserError

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)
IMAGE_SUFFIXES = TIFF_SUFFIXES + PNG_SUFFIXES


# Everything a truncated or corrupt file makes tifffile / Pillow raise; turned into one UserError.
_READ_ERRORS = (tifffile.TiffFileError, OSError, ValueError, EOFError, IndexError, KeyError,
                SyntaxError, RuntimeError, MemoryError)


def scale_by_dtype(arr: np.ndarray, *, source: str = "image") -> np.ndarray:
    """Scale an image to float32 in [0, 1] by its dtype (the only normalisation the data layer does).

    Args:
        arr: uint8 (divided by 255), uint16 (divided by 65535), bool, or float (kept as is).
        source: file name used in the error message.

    Returns:
        float32 array of the same shape.

    Raises:
        UserError: for any other dtype.
    """
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255)
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / np.float32(65535)
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32, copy=False)
    raise UserError(f"{source}: pixel type {arr.dtype} is not supported; "
                    f"save the images as uint8, uint16 or float (scaled to [0, 1])")


@dataclass
class StackInfo:
    """What the header of one image stack says (:func:`stack_info`).

    Args:
        path: the file (None for the built-in synthetic stack).
        num_slices, height, width, channels: stack geometry.
        dtype: raw pixel dtype.
    """

    path: Path | None
    num_slices: int
    height: int
    width: int
    channels: int
    dtype: np.dtype

    @property
    def name(self) -> str:
        """The file's stem (``a.ome.tif`` -> ``a``), or ``synthetic``."""
        return "synthetic" if self.path is None else self.path.name.split(".")[0]


# ----------------------------------------------------------------------------------------------- reading

def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise UserError(f"{path}: is not a file; give the path of a TIFF or PNG image")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; use TIFF (.tif/.tiff) or PNG (.png)")


def _unreadable(path: Path, exc: BaseException) -> UserError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return UserError(f"{path}: cannot be read ({reason[:200]}); the file is truncated or corrupt, "
                     f"copy or export it again")


@dataclass
class _Layout:
    """How a TIFF series maps to ``(N, [C,] H, W)``: which leading axes are slices and which are channels."""

    lead_shape: tuple[int, ...]   # series shape without the Y, X (and S) axes, in page order
    channel_axis: int | None      # index into lead_shape of a hyperstack channel axis
    samples: int                  # samples per pixel (RGB = 3), 1 when there is no S axis
    planar: bool                  # samples stored as separate planes (S before Y, X)
    height: int
    width: int
    dtype: np.dtype

    @property
    def planes_per_slice(self) -> int:
        """Planes per slice: the length of the hyperstack channel axis, 1 without one."""
        return self.lead_shape[self.channel_axis] if self.channel_axis is not None else 1

    @property
    def channels(self) -> int:
        return self.samples * self.planes_per_slice

    @property
    def num_slices(self) -> int:
        return math.prod(self.lead_shape) // self.planes_per_slice


def _series_yx(series) -> tuple[int, int]:
    return int(series.shape[series.axes.index("Y")]), int(series.shape[series.axes.index("X")])


def _check_single_series(tif: tifffile.TiffFile, path: Path) -> None:
    # tifffile splits pages of different sizes into several series and every reader here uses the first:
    # without this check a stack with one odd page would silently lose the pages after it.
    series = list(tif.series)
    if len(series) <= 1:
        return
    height, width = _series_yx(series[0])
    first_page = 0
    for s in series:
        ph, pw = _series_yx(s)
        if (ph, pw) != (height, width):
            raise UserError(f"{path}: page {first_page} is {pw}x{ph} but the stack's first page is "
                            f"{width}x{height}; all slices of a stack must have the same size, "
                            f"save them as separate files")
        first_page += len(s.pages)
    raise UserError(f"{path}: TIFF holds {len(series)} image series; only single-series stacks are "
                    f"supported, save each series as its own file")


def _check_pages_complete(tif: tifffile.TiffFile, path: Path) -> None:
    """Refuse a TIFF whose pages cannot all be read (truncated or cut-off IFD chain, pixel data past the end).

    tifffile only logs "invalid page offset" and hands back the pages before the break, so a truncated stack
    would be read as a shorter one. Reads page headers only (no pixel data), once per open file.
    """
    fh = tif.filehandle
    pages = tif.pages
    num_pages = len(pages)  # indexes every IFD; stops at the first one that is missing or corrupt
    # The last IFD read ends with the offset of the next one: anything but 0 means the chain was cut short.
    fh.seek(pages.next_page_offset)
    raw = fh.read(tif.tiff.offsetsize)
    chain_ok = len(raw) == tif.tiff.offsetsize and struct.unpack(tif.tiff.offsetformat, raw)[0] == 0
    for k in range(num_pages):
        page = pages[k]
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > fh.size:
            raise _truncated(path, k, f"its pixel data runs past the end of the file ({fh.size} bytes)")
    expected = _header_image_count(tif)
    if not chain_ok and (expected is None or expected > num_pages):
        raise _truncated(path, num_pages, f"the file holds {num_pages} readable page(s)"
                                          + (f" of {expected} its header lists" if expected else ""))
    if expected is not None and expected != num_pages and not _imagej_contiguous_fits(tif, expected):
        raise _truncated(path, min(num_pages, expected),
                         f"its header lists {expected} image(s) but the file holds {num_pages} page(s)")


def _truncated(path: Path, page: int, why: str) -> UserError:
    return UserError(f"{path}: page {page} cannot be read ({why}); the file is truncated or corrupt, "
                     f"copy or export it again")


def _header_image_count(tif: tifffile.TiffFile) -> int | None:
    """Number of TIFF pages the ImageJ or OME header says the file holds; None without such a header."""
    if tif.is_imagej and tif.imagej_metadata and "images" in tif.imagej_metadata:
        return int(tif.imagej_metadata["images"])
    if tif.is_ome and tif.ome_metadata:
        import xml.etree.ElementTree as ET
        try:
            root = ET.fromstring(tif.ome_metadata)
        except ET.ParseError:
            return None
        # Only single-file, single-image OME (the kind this reader accepts): Z x C x T planes, one page each.
        images = [e for e in root.iter() if e.tag.endswith("}Image")]
        if len(images) != 1 or any(e.tag.endswith("}UUID") for e in root.iter()):
            return None
        pixels = next((e for e in images[0] if e.tag.endswith("}Pixels")), None)
        if pixels is None:
            return None
        sizes = [int(pixels.get(k, 1)) for k in ("SizeZ", "SizeC", "SizeT")]
        channels = [e for e in pixels if e.tag.endswith("}Channel")]
        samples = int(channels[0].get("SamplesPerPixel", 1)) if channels else 1
        return math.prod(sizes) // max(samples, 1)
    return None


def _imagej_contiguous_fits(tif: tifffile.TiffFile, expected: int) -> bool:
    # ImageJ files > 4 GB keep fewer IFDs than images and store the planes back to back after the first
    # page's data; such a file is whole when all those bytes are there.
    page = tif.pages.first
    if not tif.is_imagej or tif.filehandle.size < 2 ** 32 or not page.is_contiguous or page.compression != 1:
        return False
    return page.dataoffsets[0] + page.nbytes * expected <= tif.filehandle.size


def _tiff_layout(tif: tifffile.TiffFile, path: Path) -> _Layout:
    _check_pages_complete(tif, path)
    if not tif.series:
        raise UserError(f"{path}: TIFF file has no images; export the stack again")
    _check_single_series(tif, path)
    series = tif.series[0]
    axes, shape = series.axes, tuple(series.shape)
    if 0 in shape or len(series.pages) == 0:
        raise UserError(f"{path}: the stack is empty (no slices); export it again")
    if "Y" not in axes or "X" not in axes:
        raise UserError(f"{path}: TIFF series has axes {axes!r} without Y and X; save it as a plain image stack")
    samples = shape[axes.index("S")] if "S" in axes else 1
    planar = "S" in axes and axes.index("S") < axes.index("Y")
    lead_axes = axes.replace("Y", "").replace("X", "").replace("S", "")
    lead_shape = tuple(s for a, s in zip(axes, shape) if a in lead_axes)
    channel_axis = None
    if "C" in lead_axes:
        others = [s for a, s in zip(lead_axes, lead_shape) if a != "C"]
        # Old ImageJ writers (the ISBI 2012 stacks among them) store a plain stack as "channels";
        # a C axis only means channels when the stack also has another axis with more than one plane.
        if any(s > 1 for s in others):
            channel_axis = lead_axes.index("C")
    if samples > 1 and channel_axis is not None:
        raise UserError(f"{path}: TIFF has both RGB samples and a channel axis ({axes!r}); save it as grayscale")
    return _Layout(lead_shape, channel_axis, samples, planar, shape[axes.index("Y")], shape[axes.index("X")],
                   np.dtype(series.dtype))


def _planes(arr: np.ndarray, layout: _Layout, lead: int) -> np.ndarray:
    """View ``lead`` leading planes of pixel data as ``(lead, S, H, W)`` whatever the sample layout."""
    if layout.planar:
        return arr.reshape(lead, layout.samples, layout.height, layout.width)
    return np.moveaxis(arr.reshape(lead, layout.height, layout.width, layout.samples), -1, 1)


def _normalise(arr: np.ndarray, layout: _Layout) -> np.ndarray:
    """Reshape a series array ``(*lead, [S,] H, W[, S])`` to ``(N, H, W)`` or ``(N, C, H, W)``."""
    arr = _planes(arr, layout, math.prod(layout.lead_shape))
    arr = arr.reshape(*layout.lead_shape, layout.samples, layout.height, layout.width)
    if layout.channel_axis is not None:
        arr = np.moveaxis(arr, layout.channel_axis, len(layout.lead_shape) - 1)  # channels next to samples
    arr = arr.reshape(layout.num_slices, layout.channels, layout.height, layout.width)
    return arr[:, 0] if layout.channels == 1 else arr


def _png_array(img: Image.Image) -> np.ndarray:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I;16B", "I;16L", "I;16N"):
        img = img.convert("I;16")
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = np.moveaxis(arr, -1, 0)
    return arr[None]


def read_stack(path: str | Path) -> np.ndarray:
    """Read a whole image stack in its raw dtype.

    Args:
        path: multi-page TIFF, ImageJ hyperstack, OME-TIFF, or a single TIFF/PNG image (N = 1).

    Returns:
        ``(N, H, W)``, or ``(N, C, H, W)`` for RGB pixels or a hyperstack with channels.

    Raises:
        UserError: missing, unsupported, unreadable or truncated file, or an empty stack.
    """
    path = Path(path)
    _check_file(path)
    try:
        if path.suffix.lower() in PNG_SUFFIXES:
            with Image.open(path) as img:
                img.load()
                arr = _png_array(img)
        else:
            with tifffile.TiffFile(path) as tif:
                layout = _tiff_layout(tif, path)
                arr = _normalise(tif.series[0].asarray(), layout)
    except UserError:
        raise
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    check_finite(arr, path)
    return arr


def check_finite(slices: np.ndarray, path: Path | str, first: int = 0) -> None:
    """Refuse NaN or Inf pixels in a float stack; ``slices[k]`` is slice ``first + k`` of ``path``.

    Integer pixels cannot be non-finite, so only float data pays for the check (one pass, once per read).

    Raises:
        UserError: naming the file and the first slice with a non-finite pixel.
    """
    if slices.dtype.kind not in "fc":
        return
    # A sum is NaN/Inf when any term is (and cheaper than a full mask); the exact test runs only on slices whose
    # sum is not finite, so an overflowing sum of huge but finite pixels is no false alarm.
    with np.errstate(over="ignore", invalid="ignore"):
        suspects = np.flatnonzero(~np.isfinite(slices.reshape(len(slices), -1).sum(axis=1)))
    for k in suspects:
        bad = int(np.count_nonzero(~np.isfinite(slices[k])))
        if bad:
            raise UserError(f"{path}: slice {first + k} has {bad} non-finite pixel(s) (NaN or Inf); "
                            f"fix or mask them in the image before using it")


def stack_info(path: str | Path) -> StackInfo:
    """Shape and dtype of a stack from its header, without reading the pixels.

    Args:
        path: a file :func:`read_stack` accepts.

    Returns:
        A :class:`StackInfo`.
    """
    path = Path(path)
    _check_file(path)
    try:
        if path.suffix.lower() in PNG_SUFFIXES:
            with Image.open(path) as img:
                # The mode (and, for palettes, the transparency entry) fixes channels and dtype, so a blank
                # 1 x 1 image of that mode stands in for the pixels; crop() would decode the whole file.
                blank = Image.new(img.mode, (1, 1))
                blank.info = img.info
                probe = _png_array(blank)
                channels = probe.shape[1] if probe.ndim == 4 else 1
                return StackInfo(path, 1, int(img.height), int(img.width), int(channels), np.dtype(probe.dtype))
        with tifffile.TiffFile(path) as tif:
            layout = _tiff_layout(tif, path)
            return StackInfo(path, int(layout.num_slices), int(layout.height), int(layout.width),
                             int(layout.channels), np.dtype(layout.dtype))
    except UserError:
        raise
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc


def iter_pages(path: str | Path, batch: int) -> Iterator[np.ndarray]:
    """Stream a stack in chunks of slices, reading only the TIFF pages each chunk needs.

    Args:
        path: a file :func:`read_stack` accepts.
        batch: slices per chunk (the last chunk may be shorter).

    Returns:
        An iterator of ``(b, H, W)`` or ``(b, C, H, W)`` arrays in raw dtype; concatenated they equal
        ``read_stack(path)``.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in PNG_SUFFIXES:
        yield read_stack(path)
        return
    try:
        with tifffile.TiffFile(path) as tif:
            layout = _tiff_layout(tif, path)
            series = tif.series[0]
            num_pages = math.prod(layout.lead_shape)
            if len(series.pages) != num_pages:
                # Pages do not map one-to-one to planes (e.g. ImageJ files > 4 GB): read it all at once.
                whole = _normalise(series.asarray(), layout)
                check_finite(whole, path)
                yield from iter_chunks(whole, batch)
                return
            lead = list(layout.lead_shape)
            c_axis = layout.channel_axis
            slice_shape = [s for k, s in enumerate(lead) if k != c_axis]
            for start in range(0, layout.num_slices, batch):
                stop = min(start + batch, layout.num_slices)
                keys = []
                for n in range(start, stop):
                    pos = list(np.unravel_index(n, slice_shape)) if slice_shape else []
                    for c in range(layout.planes_per_slice):
                        full = pos[:c_axis] + [c] + pos[c_axis:] if c_axis is not None else pos
                        keys.append(int(np.ravel_multi_index(full, lead)) if lead else 0)
                pages = _planes(tif.asarray(key=keys, series=0), layout, len(keys))
                pages = pages.reshape(stop - start, layout.channels, layout.height, layout.width)
                check_finite(pages, path, start)
                yield pages[:, 0] if layout.channels == 1 else pages
    except UserError:
        raise
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc


def iter_chunks(arr: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """``arr`` in consecutive pieces of ``batch`` items along the first axis (the last may be shorter)."""
    for start in range(0, len(arr), batch):
        yield arr[start:start + batch]


# ------------------------------------------------------------------------------------------ folders

def list_images(folder: Path) -> list[Path]:
    """Image files (TIFF or PNG) directly in ``folder``, sorted by name, hidden files skipped."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def as_image(raw: np.ndarray, path: Path | str, channels: int | None) -> np.ndarray:
    """A raw ``(H, W)`` or ``(C, H, W)`` slice as a [0, 1] float ``(C, H, W)`` image; ``channels`` is checked."""
    img = raw[None] if raw.ndim == 2 else raw
    if channels is not None and img.shape[0] != channels:
        kind = " (RGB)" if img.shape[0] in (3, 4) else ""
        raise UserError(f"{path}: images have {img.shape[0]} channels{kind} but {channels} expected; "
                        f"convert the images to {'grayscale' if channels == 1 else f'{channels} channels'}")
    return scale_by_dtype(img, source=str(path))
