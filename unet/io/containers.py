"""Arrays inside containers, opened read-only and lazily: zarr (v2 and v3, OME-Zarr), N5 and HDF5.

* zarr: the ``zarr`` package (3.x API: ``zarr.open(store=..., path=..., mode="r")``, ``Group.members()``,
  ``Array.metadata``; no ``zarr.storage.N5Store`` any more). A group with OME-NGFF ``multiscales`` metadata
  opens at level ``scale`` (:mod:`unet.io.ome`); a plain array takes its axis names from zarr v3
  ``dimension_names`` or xarray's ``_ARRAY_DIMENSIONS`` attribute (zarr v2) when present.
* N5: zarr 3 dropped N5, so tensorstore's ``n5`` driver reads it. N5 lists dimensions fastest-first (x, y, z);
  the array is shown in C order (z, y, x), as z5py, elf and zarr 2's N5Store did.
* HDF5: ``h5py``; axis names from HDF5 dimension labels (``ds.dims[i].label``) when every dimension has one.

A key that is missing, or names a group, is refused with the list of keys that do exist.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import tensorstore as ts
import zarr

from unet.errors import UserError
from unet.io.hdf5_chunks import ChunkCodec, direct_codec
from unet.io.ome import multiscales_of, ome_level
from unet.io.paths import VolumePath
from unet.io.sources import ArraySource, axes_from_names

# Errors a damaged metadata file or a non-container makes the libraries raise, turned into one UserError.
_OPEN_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError)


def _cannot_open(vp: VolumePath, exc: BaseException) -> UserError:
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return UserError(f"{vp}: cannot be opened as {vp.kind} ({reason}); the metadata is missing or corrupt")


def _missing_key(vp: VolumePath, keys: list[str], what: str) -> UserError:
    # The root itself (an OME-Zarr image, a root array) is shown as the container path, said to be the root.
    shown = ", ".join(vp.child(k) if k else f"{vp.container} (the root)" for k in keys[:20]) \
        + (f" (and {len(keys) - 20} more)" if len(keys) > 20 else "")
    return UserError(f"{vp}: {what}; " + (f"the arrays in {vp.container} are: {shown}" if keys
                                          else f"{vp.container} holds no arrays"))


def _check_exists(vp: VolumePath) -> None:
    if not vp.container.exists():
        raise UserError(f"{vp.container}: not found; check the path")


# ------------------------------------------------------------------------------------------------ zarr

def _zarr_node(folder: Path) -> tuple[str | None, dict]:
    """(``"array"``, ``"group"`` or None, attributes) of a zarr v2 or v3 node, read from its metadata files."""
    try:
        if (folder / "zarr.json").is_file():
            meta = json.loads((folder / "zarr.json").read_text(encoding="utf-8"))
            return meta.get("node_type"), meta.get("attributes") or {}
        attrs = json.loads((folder / ".zattrs").read_text(encoding="utf-8")) if (folder / ".zattrs").is_file() else {}
    except (OSError, ValueError, AttributeError):
        return None, {}
    return ("array" if (folder / ".zarray").is_file() else "group" if (folder / ".zgroup").is_file() else None), attrs


def _zarr_keys(root: Path, folder: Path | None = None) -> list[str]:
    """Keys of the arrays under ``folder`` (default ``root``), from the files on disk; an OME-Zarr image counts
    as one entry (its group's key). Read from disk, not through zarr: zarr v2 stores need not have a group at
    every level, and the root may itself be an array."""
    folder = folder or root
    kind, attrs = _zarr_node(folder)
    if kind == "array" or (kind == "group" and multiscales_of(attrs)):
        return [folder.relative_to(root).as_posix() if folder != root else ""]
    keys = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        keys.extend(_zarr_keys(root, sub))
    return keys


def _zarr_source(vp: VolumePath, arr: zarr.Array, axes: str | None) -> ArraySource:
    def chunk_name(coords):
        key = arr.metadata.encode_chunk_key(tuple(coords))
        return f"chunk {tuple(coords)} ({vp.container}/{arr.path + '/' if arr.path else ''}{key})"

    return ArraySource(str(vp), tuple(arr.shape), np.dtype(arr.dtype), tuple(arr.chunks), axes,
                       read=lambda index: np.asarray(arr[index]), chunk_name=chunk_name)


def _zarr_axes(arr: zarr.Array, source: str) -> str | None:
    names = getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS")
    return axes_from_names(names, source) if names else None


def open_zarr(vp: VolumePath, scale: int) -> ArraySource:
    """The zarr array (or OME-Zarr image level ``scale``) at ``vp``.

    Raises:
        UserError: missing container or key (listing the keys), a plain group, unreadable metadata.
    """
    _check_exists(vp)
    try:
        node = zarr.open(store=str(vp.container), path=vp.key, mode="r")
    except FileNotFoundError:
        what = f"no array or image named {vp.key!r}" if vp.key else "no array or image at the store's root"
        raise _missing_key(vp, _zarr_keys(vp.container), what) from None
    except _OPEN_ERRORS as exc:
        raise _cannot_open(vp, exc) from exc
    if isinstance(node, zarr.Array):
        return _zarr_source(vp, node, _zarr_axes(node, str(vp)))
    level = ome_level(node.attrs.asdict(), scale, str(vp)) if multiscales_of(node.attrs.asdict()) else None
    if level is None:
        raise _missing_key(vp, _zarr_keys(vp.container, vp.container / vp.key),
                           "is a group without OME-NGFF metadata, not an array; give an array's key")
    try:
        arr = node[level.path]
    except (KeyError, FileNotFoundError):
        raise UserError(f"{vp}: OME-NGFF level {scale} names array {level.path!r}, which does not exist; "
                        f"the image is incomplete, write it again") from None
    return _zarr_source(vp, arr, level.axes)


# -------------------------------------------------------------------------------------------------- N5

def _n5_attributes(folder: Path) -> dict:
    try:
        return json.loads((folder / "attributes.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _n5_keys(root: Path) -> list[str]:
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("attributes.json")
                  if "dimensions" in _n5_attributes(p.parent))


def open_n5(vp: VolumePath) -> ArraySource:
    """The N5 dataset at ``vp``, in C axis order (reversed from N5's ``dimensions``).

    Raises:
        UserError: missing container or dataset (listing the datasets), unreadable metadata.
    """
    _check_exists(vp)
    folder = vp.container / vp.key
    attrs = _n5_attributes(folder)
    if "dimensions" not in attrs:
        raise _missing_key(vp, _n5_keys(vp.container), f"no N5 dataset named {vp.key!r}")
    try:
        store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(folder)}},
                        read=True, open=True).result()
    except _OPEN_ERRORS as exc:
        raise _cannot_open(vp, exc) from exc
    view = store.T  # N5 order is x, y, z; C order is z, y, x
    names = attrs.get("axes")
    axes = axes_from_names(list(reversed(names)), str(vp)) if isinstance(names, list) else None

    def chunk_name(coords):
        return f"chunk {tuple(coords)} ({folder / '/'.join(str(c) for c in reversed(coords))})"

    return ArraySource(str(vp), tuple(view.shape), np.dtype(view.dtype.numpy_dtype),
                       tuple(reversed(attrs["blockSize"])), axes,
                       read=lambda index: np.asarray(view[index].read().result()), chunk_name=chunk_name)


# ------------------------------------------------------------------------------------------------ HDF5

def _h5_keys(group: h5py.Group) -> list[str]:
    keys: list[str] = []
    group.visititems(lambda name, obj: keys.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sorted(keys)


def _h5_dataset(vp: VolumePath, f: h5py.File) -> h5py.Dataset:
    if not vp.key:
        keys = _h5_keys(f)
        if len(keys) == 1:
            return f[keys[0]]
        raise _missing_key(vp, keys, "holds several datasets; give one as the key" if keys else "no key given")
    obj = f.get(vp.key)
    if isinstance(obj, h5py.Dataset):
        return obj
    what = "is a group, not a dataset" if isinstance(obj, h5py.Group) else f"no dataset named {vp.key!r}"
    raise _missing_key(vp, _h5_keys(f), what)


def open_hdf5(vp: VolumePath) -> ArraySource:
    """The HDF5 dataset at ``vp`` (the only one when no key is given).

    Raises:
        UserError: missing file or dataset (listing the datasets), a file that is not HDF5.
    """
    _check_exists(vp)
    try:
        f = h5py.File(vp.container, "r")
    except _OPEN_ERRORS as exc:
        raise _cannot_open(vp, exc) from exc
    try:
        ds = _h5_dataset(vp, f)
        labels = [dim.label for dim in ds.dims]
        axes = axes_from_names(labels, str(vp)) if all(labels) else None
    except BaseException:
        f.close()
        raise
    # Contiguous datasets have no chunks; a plane per chunk is what a corrupt-data search then walks.
    chunks = ds.chunks or tuple([1] * (ds.ndim - 2) + list(ds.shape[-2:]))
    read, close = (lambda index: np.asarray(ds[index])), f.close
    if direct_codec(ds):  # gzip chunks decoded on every core, not h5py's one (unet.io.hdf5_chunks)
        codec = ChunkCodec(ds)
        read = codec.read

        def close():
            codec.close()
            f.close()
    return ArraySource(str(vp), tuple(ds.shape), np.dtype(ds.dtype), tuple(chunks), axes, read=read,
                       chunk_name=lambda coords: f"chunk {tuple(coords)} of dataset /{ds.name.lstrip('/')}",
                       close=close)
