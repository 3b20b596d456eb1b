"""Image volumes of any supported format as lazy, read-only (Z, Y, X) or (Z, C, Y, X) views.

:func:`open_volume` takes a volume path in the one syntax of :mod:`unet.io.paths` (the container's path, then
the array's key: ``stack.tif``, ``volume.zarr/raw``, ``image.ome.zarr``, ``data.n5/raw``, ``data.h5/volumes/raw``)
and returns a :class:`Volume`: shape, dtype, chunk shape and axes from the metadata alone, and
:meth:`Volume.read` for a z-range and a y/x window, which decodes only the chunks (TIFF strips/tiles) that the
region overlaps. Values come back in the stored dtype; :func:`unet.io.images.scale_by_dtype` scales them.

Axes: an array's axis names come from its metadata (OME-NGFF axes, zarr v3 ``dimension_names``, xarray's
``_ARRAY_DIMENSIONS``, HDF5 dimension labels) or the ``axes`` argument; without either, 2-D arrays are
``yx`` (one slice) and 3-D arrays ``zyx``, and any other rank is refused. Names other than t, c, z, y, x are
refused. A time axis longer than 1 must be picked with ``time=``; a channel axis is kept as C unless
``channel=`` picks one. Pixel types: images uint8, uint16, float32, bool, and float64 (taken, like float32, as
already scaled to [0, 1] and converted to float32 by ``scale_by_dtype``: no rescaling is guessed); labels
(``labels=True``) any integer type or bool.

Every problem (missing file or key, wrong rank or dtype, unknown axes, a corrupt chunk) is one
:class:`~unet.errors.UserError` line naming the volume.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unet.errors import UserError
from unet.io.containers import open_hdf5, open_n5, open_zarr
from unet.io.paths import VolumePath, parse_volume_path
from unet.io.sources import ArraySource, axes_from_names, read_region
from unet.io.tiff_volumes import open_png, open_tiff
from unet.options import non_negative_int, option

IMAGE_DTYPES = tuple(np.dtype(d) for d in ("uint8", "uint16", "float32", "float64", "bool"))
_DEFAULT_AXES = {2: "yx", 3: "zyx"}


VOLUME_GROUP = "volume inputs (zarr, OME-Zarr, N5, HDF5)"


@dataclass(frozen=True)
class VolumeOptions:
    """Which image of a chunked volume is read: :func:`open_volume`'s choices, one flag each for every command.

    Attributes:
        scale: OME-Zarr resolution level (0 = full resolution).
        channel: the channel kept of a channel axis, or None to keep them all.
        time: the time point of a time axis, or None (required when it has several).
    """

    scale: int = option(0, "OME-Zarr resolution level of a volume input (0 = full resolution)", flags="--scale",
                        parse=non_negative_int, metavar="N", group=VOLUME_GROUP)
    channel: int | None = option(None, "which channel of a volume input with a channel axis to use (default: every "
                                       "channel, as many as the model takes)", flags="--channel",
                                 parse=non_negative_int, metavar="C", group=VOLUME_GROUP)
    time: int | None = option(None, "which time point of a volume input with a time axis to use (needed when it has "
                                    "several)", flags="--time", parse=non_negative_int, metavar="T",
                              group=VOLUME_GROUP)

    def open(self, spec: str, *, labels: bool = False) -> "Volume":
        """:func:`open_volume` with these choices."""
        return open_volume(spec, scale=self.scale, channel=self.channel, time=self.time, labels=labels)

    def given(self) -> list[str]:
        """The choices that differ from the defaults, as typed on the command line (``["--scale 1"]``)."""
        default = VolumeOptions()
        return [f"--{name} {value}" for name, value in vars(self).items() if value != getattr(default, name)]


def _check_axes(src: ArraySource, axes: str | None) -> str:
    if axes is not None:
        axes = axes_from_names(list(axes), src.name) or ""
    axes = axes or src.axes or _DEFAULT_AXES.get(len(src.shape))
    if axes is None:
        raise UserError(f"{src.name}: array has {len(src.shape)} dimensions {src.shape} and no axis names; "
                        f"volumes are (z, y, x) or (y, x), or name the axes (e.g. axes='czyx')")
    if len(axes) != len(src.shape):
        raise UserError(f"{src.name}: axes {axes!r} do not match the array's {len(src.shape)} dimensions "
                        f"{src.shape}; give one name per dimension")
    if len(set(axes)) != len(axes) or "y" not in axes or "x" not in axes:
        raise UserError(f"{src.name}: axes {axes!r} must name y and x once each (and t, c, z at most once)")
    return axes


def _check_dtype(src: ArraySource, labels: bool) -> None:
    if labels and (src.dtype.kind in "iu" or src.dtype == np.bool_):
        return
    if not labels and src.dtype in IMAGE_DTYPES:
        return
    want = "an integer type" if labels else "uint8, uint16 or float32 (floats taken as already in [0, 1])"
    raise UserError(f"{src.name}: pixel type {src.dtype} is not supported for {'labels' if labels else 'images'}; "
                    f"save the volume as {want}")


def _pick(src: ArraySource, axes: str, letter: str, value: int | None, option: str) -> int | None:
    """The fixed index on axis ``letter`` (t or c), or None to keep the axis."""
    if letter not in axes:
        if value not in (None, 0):
            raise UserError(f"{src.name}: has no {option} axis (axes {axes!r}); leave {option} unset")
        return None
    size = src.shape[axes.index(letter)]
    if value is None:
        if letter == "c":
            return None
        if size == 1:
            return 0
        raise UserError(f"{src.name}: has {size} time points (axes {axes!r}); pick one with time=0..{size - 1}")
    if not 0 <= value < size:
        raise UserError(f"{src.name}: {option} {value} does not exist; the {option} axis has {size} entries, "
                        f"0 to {size - 1}")
    return value


def _plain(s: slice, size: int) -> slice:
    start, stop, _ = s.indices(size)
    return slice(start, max(start, stop))


@dataclass
class Volume:
    """A lazily read volume; see the module docstring. Use as a context manager or call :meth:`close`.

    Args:
        name: the volume path as given.
        source: the opened array in its stored axis order.
        stored_axes: one letter per stored dimension.
        fixed: stored axis letter -> the index kept of it (time point, picked channel).
    """

    name: str
    source: ArraySource
    stored_axes: str
    fixed: dict[str, int]

    @property
    def axes(self) -> str:
        """``"zyx"`` or ``"zcyx"``: the order of :attr:`shape` and of what :meth:`read` returns."""
        return "zcyx" if "c" in self.stored_axes and "c" not in self.fixed else "zyx"

    def _stored(self, letter: str, values: tuple[int, ...], missing: int) -> int:
        return values[self.stored_axes.index(letter)] if letter in self.stored_axes else missing

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._stored(a, self.source.shape, 1) for a in self.axes)

    @property
    def chunks(self) -> tuple[int, ...]:
        """Chunk shape in :attr:`axes` order: the unit a read decodes."""
        return tuple(self._stored(a, self.source.chunks, 1) for a in self.axes)

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    def read(self, z: slice = slice(None), y: slice = slice(None), x: slice = slice(None)) -> np.ndarray:
        """Read one region; only the chunks it overlaps are read.

        Args:
            z, y, x: the region, with numpy's slicing rules (negative or past-the-end bounds); step 1 only.

        Returns:
            ``(Z, Y, X)`` or ``(Z, C, Y, X)`` (:attr:`axes` order) in the stored dtype.

        Raises:
            UserError: a chunk in the region cannot be decoded (naming it).
        """
        if any(s.step not in (None, 1) for s in (z, y, x)):
            raise ValueError("Volume.read takes slices with step 1")
        # Bounds as numpy resolves them (negative, past the end, empty), so every format sees plain ranges.
        spatial = {a: _plain(s, self._stored(a, self.source.shape, 1)) for a, s in (("z", z), ("y", y), ("x", x))}
        z = spatial["z"]
        index = tuple(self.fixed[a] if a in self.fixed else spatial.get(a, slice(None)) for a in self.stored_axes)
        data = read_region(self.source, index)
        kept = [a for a in self.stored_axes if a not in self.fixed]
        data = np.transpose(data, [kept.index(a) for a in self.axes if a in kept])
        if "z" not in kept:  # a 2-D image is one slice
            data = data[None] if len(range(*z.indices(1))) else np.zeros((0,) + data.shape, data.dtype)
        return data

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_source(vp: VolumePath, scale: int) -> ArraySource:
    if vp.kind == "zarr":
        return open_zarr(vp, scale)
    if scale:
        raise UserError(f"{vp}: scale {scale} asked for, but only OME-Zarr images have resolution levels")
    return {"n5": open_n5, "hdf5": open_hdf5, "tiff": open_tiff, "png": open_png}[vp.kind](vp)


def open_volume(spec: str, *, scale: int = 0, channel: int | None = None, time: int | None = None,
                axes: str | None = None, labels: bool = False) -> Volume:
    """Open an image (or label) volume lazily, read-only.

    Args:
        spec: a volume path (:mod:`unet.io.paths`): ``stack.tif``, ``a.png``, ``v.zarr/raw``, ``img.ome.zarr``,
            ``v.n5/raw``, ``v.h5/volumes/raw``.
        scale: OME-Zarr resolution level (0 = full resolution).
        channel: keep only this channel of a channel axis (default: keep all, as ``(Z, C, Y, X)``).
        time: the time point of a time axis (required when it has more than one).
        axes: axis names for arrays whose metadata has none, e.g. ``"czyx"``; overrides the metadata.
        labels: accept integer label volumes instead of image pixel types.

    Returns:
        A :class:`Volume` (close it, or use ``with``).

    Raises:
        UserError: missing file/key (the keys that exist are listed), wrong rank, unsupported dtype, unknown
            axes, a missing scale, time or channel.
    """
    vp = parse_volume_path(spec)
    src = _open_source(vp, scale)
    try:
        stored = _check_axes(src, axes)
        _check_dtype(src, labels)
        fixed = {a: i for a, i in (("t", _pick(src, stored, "t", time, "time")),
                                   ("c", _pick(src, stored, "c", channel, "channel"))) if i is not None}
        if any(src.shape[stored.index(a)] == 0 for a in stored):
            raise UserError(f"{src.name}: the volume is empty (shape {src.shape}); write it again")
    except BaseException:
        src.close()
        raise
    return Volume(str(vp), src, stored, fixed)
