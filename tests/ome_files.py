"""OME-Zarr images written for tests: a multiscale group with the given levels and axis names (no library writer,
so that the reader is tested against the spec's layout itself, v0.4 and v0.5)."""
import numpy as np
import zarr


def write_ome_zarr(path, axes: str, levels: list[np.ndarray], *, zarr_format: int = 3, version_key: str = "ome"):
    """Write ``levels`` (full resolution first) as one OME-Zarr multiscale image.

    Args:
        path: the group's folder.
        axes: one letter per array axis, e.g. ``"tczyx"``.
        levels: the arrays of levels 0, 1, ..., each one chunk.
        zarr_format: 2 or 3.
        version_key: ``"ome"`` (v0.5: metadata under the ``ome`` attribute) or ``"top"`` (v0.4: ``multiscales`` at
            the top level).

    Returns:
        ``levels``, as written.
    """
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    for k, values in enumerate(levels):
        root.create_array(str(k), shape=values.shape, chunks=values.shape, dtype=values.dtype)[...] = values
    image = {"axes": [{"name": a} for a in axes],
             "datasets": [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [1] * len(axes)}]}
                          for k in range(len(levels))]}
    root.attrs.update({"ome": {"version": "0.5", "multiscales": [image]}} if version_key == "ome"
                      else {"multiscales": [dict(image, version="0.4")]})
    return levels
