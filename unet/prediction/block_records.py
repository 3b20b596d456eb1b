"""Completion records of a block-wise run, so that ``infer.py --resume`` redoes only unfinished blocks (daisy's
per-block done flags; pytorch_connectomics' chunk manifest).

The records live beside the mask output's container, in ``<container>.unet_blocks/`` (``masks.zarr`` ->
``masks.zarr.unet_blocks``), so that they work alike for a zarr folder and an HDF5 file and never end up inside
the finished output:

* ``manifest.json``: the run's identity (input path, shape, dtype and volume choices; the checkpoints' SHA-256;
  precision; tiling; outputs, chunks and block size; the number of blocks), written atomically before any block.
  A resume whose identity differs is refused with one line naming the first difference.
* ``done/<index>``: one empty file per block, created only after the block's chunks were handed to every output
  (HDF5 flushed), so a record never claims a block whose chunks a crash could still lose from the process.
  Creating an empty file is atomic: the record either exists or not.
* Later passes of the same run (the cell instances of :mod:`unet.prediction.block_instances`) keep their own
  stage folders, ``<stage>/<index>`` (blocks or slices), the same way; a record may carry the pass's small result
  (``<index>.npz``: written under a hidden name and renamed, so it is complete or absent).

The folder is removed once every output is committed under its final name.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from unet.atomic import atomic_write, write_error
from unet.errors import UserError

RECORDS_SUFFIX = ".unet_blocks"
MANIFEST = "manifest.json"
DONE = "done"  # the prediction pass's stage (its folder name predates the later passes)
VERSION = 1
# What a differing top-level manifest entry means to the user.
_MEANING = {"input": "another input", "checkpoints": "another checkpoint", "precision": "another precision",
            "tiling": "another tiling", "outputs": "other outputs", "chunks": "another --chunks",
            "block_size": "another --block-size", "blocks": "another block count", "version": "another version",
            "instances": "other instance settings"}


def records_path(container: Path) -> Path:
    """The records folder of an output container."""
    container = Path(container)
    return container.with_name(container.name + RECORDS_SUFFIX)


def _short(value) -> str:
    """A manifest value for a message: hashes shortened, lists and dicts compact."""
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def manifest_difference(old: dict, new: dict) -> str | None:
    """The first difference between two manifests, in words (None when they agree).

    Args:
        old: the interrupted run's manifest.
        new: this run's.

    Returns:
        e.g. ``"another checkpoint (sha256 1a2b... now 3c4d...)"`` or ``"another tiling (tile_size 716, now 700)"``.
    """
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        meaning = _MEANING.get(key, f"another {key}")
        if isinstance(a, dict) and isinstance(b, dict):
            sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            return f"{meaning} ({sub} {_short(a.get(sub))}, now {_short(b.get(sub))})"
        label = "sha256 " if key == "checkpoints" else ""
        return f"{meaning} ({label}{_short(a)}, now {_short(b)})"
    return None


class BlockRecords:
    """The records of one block-wise run.

    Args:
        container: the mask output's container (``masks.zarr``, ``pred.h5``).
    """

    def __init__(self, container: Path):
        self.folder = records_path(container)
        self.done_dir = self.folder / DONE

    def exists(self) -> bool:
        """True when an interrupted run left a manifest."""
        return (self.folder / MANIFEST).is_file()

    def start(self, manifest: dict) -> None:
        """Begin a new run: earlier records go, the manifest is written (atomically) before any block."""
        try:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self.done_dir.mkdir(parents=True)
        except OSError as exc:
            raise write_error(self.folder, exc) from None
        text = json.dumps({"version": VERSION, **manifest}, indent=1, sort_keys=True).encode()
        atomic_write(self.folder / MANIFEST, lambda f: f.write(text))

    def check(self, manifest: dict) -> None:
        """Refuse a resume whose identity differs from the interrupted run's.

        Raises:
            UserError: one line naming the first difference (or an unreadable manifest).
        """
        path = self.folder / MANIFEST
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot be read ({type(exc).__name__}); pass --overwrite to start over") from None
        difference = manifest_difference(old, {"version": VERSION, **manifest})
        if difference is not None:
            raise UserError(f"--resume: the interrupted run in {self.folder} used {difference}; rerun it with its "
                            f"settings or pass --overwrite to start over")

    def done(self, stage: str = DONE) -> set[int]:
        """Indices of the blocks (or slices) recorded as complete in ``stage``."""
        try:
            names = os.listdir(self.folder / stage)
        except FileNotFoundError:
            return set()
        stems = (n.split(".", 1)[0] for n in names)  # "12" or "12.npz"; hidden temporaries give ""
        return {int(s) for s in stems if s.isdigit()}

    def mark(self, index: int, stage: str = DONE, data: dict[str, np.ndarray] | None = None) -> None:
        """Record block (or slice) ``index`` as complete in ``stage`` (call only after its results are written),
        with ``data`` (small arrays) kept in the record itself."""
        folder = self.folder / stage
        try:
            folder.mkdir(exist_ok=True)
            if data is None:
                os.close(os.open(folder / str(index), os.O_CREAT | os.O_WRONLY, 0o666))
                return
            tmp = folder / f".{index}.{os.getpid()}.tmp.npz"
            np.savez_compressed(tmp, **data)
            os.replace(tmp, folder / f"{index}.npz")  # the record appears whole or not at all
        except OSError as exc:
            raise write_error(folder / str(index), exc) from None

    def read(self, index: int, stage: str, key: str) -> np.ndarray:
        """One array of the data kept in record ``index`` of ``stage``."""
        with np.load(self.folder / stage / f"{index}.npz") as record:
            return record[key]

    def remove(self) -> None:
        """Delete the records (the run is committed)."""
        shutil.rmtree(self.folder, ignore_errors=True)
