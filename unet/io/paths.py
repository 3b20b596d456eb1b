"""Where a volume lives: one path syntax for files and for arrays inside containers.

The syntax is the one ilastik, elf/torch-em (``open_file(path)[key]``) and zarr users already write: the
container's path followed by the array's key inside it, separated by ``/``::

    stack.tif                      a TIFF stack (or single image)
    slice.png                      one PNG image
    volume.zarr                    a zarr array, or an OME-Zarr image, at the root of the store
    volume.zarr/raw                the array (or OME-Zarr image group) "raw" inside the store
    data.n5/volumes/raw            an N5 dataset
    data.h5/volumes/raw            an HDF5 dataset (the key is the HDF5 path without the leading "/")

The container is the first path component whose suffix is ``.zarr``, ``.zr``, ``.n5``, ``.h5``, ``.hdf5`` or
``.hdf`` (case-insensitive); everything after it is the key. A directory without such a suffix that holds
zarr or N5 metadata is taken as a container with an empty key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unet.errors import UserError
from unet.io.images import PNG_SUFFIXES, TIFF_SUFFIXES

CONTAINER_KINDS = {".zarr": "zarr", ".zr": "zarr", ".n5": "n5", ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5"}
# Metadata files that mark a directory as a zarr (v2 or v3) or N5 container.
_ZARR_MARKERS = (".zarray", ".zgroup", "zarr.json")
_N5_MARKERS = ("attributes.json",)


@dataclass(frozen=True)
class VolumePath:
    """A parsed volume path.

    Args:
        container: the file or directory on disk (the TIFF/PNG file itself for images).
        key: the array's path inside the container, ``""`` for the container's root (always ``""`` for images).
        kind: ``"tiff"``, ``"png"``, ``"zarr"``, ``"n5"`` or ``"hdf5"``.
    """

    container: Path
    key: str
    kind: str

    def __str__(self) -> str:
        return f"{self.container}/{self.key}" if self.key else str(self.container)

    def child(self, key: str) -> str:
        """The path syntax for another ``key`` in the same container (used in messages listing keys)."""
        return f"{self.container}/{key}" if key else str(self.container)


def _marked_kind(folder: Path) -> str | None:
    if any((folder / m).is_file() for m in _ZARR_MARKERS):
        return "zarr"
    if any((folder / m).is_file() for m in _N5_MARKERS):
        return "n5"
    return None


def parse_volume_path(spec: str | Path) -> VolumePath:
    """Split a volume path into container, key and kind (see the module docstring for the syntax).

    Args:
        spec: the path as the user wrote it.

    Returns:
        A :class:`VolumePath`; the container is not checked for existence.

    Raises:
        UserError: the path names no supported format.
    """
    path = Path(spec)
    parts = path.parts
    for k, part in enumerate(parts):
        kind = CONTAINER_KINDS.get(Path(part).suffix.lower())
        if kind is not None:
            key = "/".join(p for p in parts[k + 1:] if p not in ("", "/"))
            return VolumePath(Path(*parts[:k + 1]), key, kind)
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return VolumePath(path, "", "tiff")
    if suffix in PNG_SUFFIXES:
        return VolumePath(path, "", "png")
    if path.is_dir() and (kind := _marked_kind(path)) is not None:
        return VolumePath(path, "", kind)
    raise UserError(f"{spec}: unsupported volume path; give a TIFF/PNG file or a container ending in "
                    f"{', '.join(CONTAINER_KINDS)} followed by the array's key, e.g. volume.zarr/raw or data.h5/raw")
