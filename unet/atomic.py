"""Atomic file output: write beside the target, fsync, rename; a crash never leaves a half-written file.

Every file the package writes (checkpoints, logs, JSON, masks, pictures, exported programs) goes through here.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from unet.errors import UserError


def temporary_path(path: Path) -> Path:
    """A new empty hidden file beside ``path`` (same folder, so the final rename is atomic), keeping its suffix."""
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def publish(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, give it the usual file permissions and rename it to ``path`` (then fsync the folder)."""
    # mkstemp creates files readable by the owner only; outputs should get what the umask gives.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # The rename itself must reach the disk too, or a power cut could bring back the old file.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; renamed to ``path`` on success, deleted on any exception."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(path: str | Path, write: Callable) -> None:
    """Call ``write(binary_file_object)`` on a temporary file beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
