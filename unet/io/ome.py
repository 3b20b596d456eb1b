"""OME-NGFF (OME-Zarr) image metadata: the ``multiscales`` entry, read and written.

A small reader of the spec rather than a dependency: it needs only the group's attributes, as zarr gives them.

* v0.4 (zarr v2 stores): ``multiscales`` is a top-level key of the group's ``.zattrs``.
* v0.5 (zarr v3 stores): it is under ``attributes["ome"]`` in the group's ``zarr.json``.

Only the first multiscale image of a group is used (the spec says readers should); its ``datasets`` are the
resolution levels, level 0 the full resolution. Axes are a list of ``{"name", "type", "unit"}`` objects
(v0.4+) or of plain names (v0.3); v0.1/v0.2 had none and imply ``tczyx``.
"""
from __future__ import annotations

from dataclasses import dataclass

from unet.errors import UserError
from unet.io.sources import axes_from_names

# The spec's axis types, for the axes this project writes.
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def multiscales_of(attrs: dict) -> list | None:
    """The ``multiscales`` list of a group's attributes (v0.5 under ``ome``, v0.4 at the top), or None."""
    ome = attrs.get("ome")
    if isinstance(ome, dict) and isinstance(ome.get("multiscales"), list):
        return ome["multiscales"]
    found = attrs.get("multiscales")
    return found if isinstance(found, list) else None


@dataclass(frozen=True)
class OmeLevel:
    """One resolution level of an OME-Zarr image.

    Args:
        path: the level's array, relative to the image group.
        axes: one letter per dimension (``tczyx`` for v0.1/v0.2 metadata, which has no axes entry).
        levels: how many levels the image has.
    """

    path: str
    axes: str
    levels: int


def ome_level(attrs: dict, scale: int, source: str) -> OmeLevel:
    """The level ``scale`` of the first multiscale image described by ``attrs``.

    Args:
        attrs: the image group's attributes.
        scale: 0 = full resolution.
        source: the volume path, for messages.

    Raises:
        UserError: no multiscales entry, no such level, malformed metadata or unknown axis names.
    """
    multiscales = multiscales_of(attrs)
    if not multiscales or not isinstance(multiscales[0], dict):
        raise UserError(f"{source}: group has no OME-NGFF multiscales metadata; give the key of an array in it")
    image = multiscales[0]
    datasets = image.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) and "path" in d
                                                                   for d in datasets):
        raise UserError(f"{source}: OME-NGFF multiscales metadata lists no datasets with a path; the metadata is "
                        f"malformed, write the image again")
    if not 0 <= scale < len(datasets):
        raise UserError(f"{source}: scale {scale} does not exist; the image has {len(datasets)} level(s), "
                        f"0 (full resolution) to {len(datasets) - 1}")
    axes = image.get("axes")
    if isinstance(axes, list):
        letters = axes_from_names([a.get("name") if isinstance(a, dict) else a for a in axes], source)
    else:
        letters = "tczyx"  # v0.1 / v0.2: no axes entry, always 5-D in this order
    return OmeLevel(str(datasets[scale]["path"]), letters, len(datasets))


def ome_attributes(axes: str, path: str = "0", version: str = "0.4", name: str = "image",
                   voxel_size: tuple[float, ...] | None = None) -> dict:
    """Group attributes describing a single-level OME-Zarr image, as napari and ome-zarr's reader expect.

    Args:
        axes: stored axis order, e.g. ``"zyx"`` or ``"czyx"`` (the spec wants time, channel, then space).
        path: the level-0 array's key in the group.
        version: ``"0.4"`` (zarr v2, top-level ``multiscales``) or ``"0.5"`` (zarr v3, under ``ome``).
        name: the image's name.
        voxel_size: physical size per spatial axis (z, y, x order), default 1 each; unit-less.

    Returns:
        The attributes dict to store on the image group.
    """
    spatial = [a for a in axes if _AXIS_TYPES[a] == "space"]
    sizes = list(voxel_size) if voxel_size is not None else [1.0] * len(spatial)
    if len(sizes) != len(spatial):
        raise ValueError(f"voxel_size {voxel_size} does not match the spatial axes of {axes!r}")
    spatial_sizes = iter(sizes)
    scale = [float(next(spatial_sizes)) if _AXIS_TYPES[a] == "space" else 1.0 for a in axes]
    image = {
        "name": name,
        "axes": [{"name": a, "type": _AXIS_TYPES[a]} for a in axes],
        "datasets": [{"path": path, "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }
    if version == "0.4":
        image["version"] = "0.4"
        return {"multiscales": [image]}
    if version == "0.5":
        return {"ome": {"version": "0.5", "multiscales": [image]}}
    raise ValueError(f"unknown OME-NGFF version {version!r}; use '0.4' or '0.5'")
