"""Atomic file output: write beside the target, fsync, rename; a crash never leaves a half-written file.

Every file the package writes (checkpoints, logs, JSON, masks, pictures, exported programs) goes through here.
A write that fails (no permission, disk full, file-size limit) becomes one :class:`UserError` naming the
target and the cause; the previous file under the target name stays as it was and the temporary is deleted.
Temporaries are named ``.<name>.<host>.<pid>.<random>.tmp<suffix>``, so the next write to the same target can
recognise, and remove, the ones a killed process (SIGKILL, power cut) left behind, and no others.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from unet.errors import UserError

# A temporary whose owner cannot be checked (another host) counts as stale after this long.
STALE_AFTER_S = 24 * 3600

# The umask can only be read by setting it: do that once, at import, not in publish(), where a writer thread
# (background checkpoint saves, the inference pipeline) would briefly give every other thread a umask of 0.
_UMASK = os.umask(0)
os.umask(_UMASK)

_HINTS = {
    errno.ENOSPC: "the disk is full; free space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free space or write elsewhere",
    errno.EFBIG: "the file-size limit was reached (ulimit -f, or the file system's largest file)",
    errno.EACCES: "no permission to write there; choose a folder you can write to",
    errno.EPERM: "the operation is not permitted there; choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose another folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder; give a file name",
}


def write_error(path: Path | str, exc: OSError) -> UserError:
    """One line naming the target ``path`` and why writing it failed."""
    cause = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    # numpy's tofile (used by tifffile) reports a short write without an errno.
    hint = _HINTS.get(exc.errno) if exc.errno is not None else "the disk may be full or a file-size limit reached"
    return UserError(f"cannot write {path}: {cause}" + (f"; {hint}" if hint else ""))


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _temporary_pattern(path: Path) -> re.Pattern:
    """Matches exactly the temporaries :func:`temporary_path` makes for ``path``: host, pid, random part."""
    return re.compile(rf"\.{re.escape(path.name)}\.([A-Za-z0-9-]+)\.(\d+)\.[A-Za-z0-9_]+\.tmp{re.escape(path.suffix)}")


def _is_stale(tmp: Path, host: str, pid: int) -> bool:
    if host == _host_tag():
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True  # its writer is gone: nothing will ever rename or delete it
        except PermissionError:
            pass  # alive, owned by someone else
    try:
        return time.time() - tmp.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


# Hidden temporaries found in a folder when this process first wrote there, by target name. Listed once per
# folder and process: listing a folder of thousands of overlays before every write would cost O(n) each time.
# A temporary that appears later belongs to a writer that was alive when we started; the next run sweeps it.
_STALE_CANDIDATES: dict[Path, dict[str, list[str]]] = {}
_ANY_TEMPORARY = re.compile(r"\.(.+)\.[A-Za-z0-9-]+\.\d+\.[A-Za-z0-9_]+\.tmp.*")


def _candidates(folder: Path) -> dict[str, list[str]]:
    key = folder.resolve()
    if key not in _STALE_CANDIDATES:
        found: dict[str, list[str]] = {}
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                m = _ANY_TEMPORARY.fullmatch(entry.name) if entry.name.startswith(".") else None
                if m:
                    found.setdefault(m.group(1), []).append(entry.name)
        _STALE_CANDIDATES[key] = found
    return _STALE_CANDIDATES[key]


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries of ``path`` left by dead writers (dead pid on this host, or older than a day)."""
    pattern = _temporary_pattern(path)
    removed = []
    for name in _candidates(path.parent).pop(path.name, []):
        tmp = path.parent / name
        m = pattern.fullmatch(name)
        if m and _is_stale(tmp, m.group(1), int(m.group(2))):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def make_folder(folder: str | Path, flag: str) -> Path:
    """``mkdir -p folder``, or a UserError naming ``flag``, the folder and why (a file in the way, no permission)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        hint = _HINTS.get(exc.errno, "") if not isinstance(exc, FileExistsError) else "a file of that name is there"
        raise UserError(f"{flag} {folder}: cannot create the folder ({exc.strerror or exc}"
                        f"{'; ' + hint if hint else ''})") from None
    return folder


def temporary_path(path: Path) -> Path:
    """A new empty hidden file beside ``path`` (same folder, so the final rename is atomic), keeping its suffix.

    Raises:
        UserError: the folder is missing or cannot be written.
    """
    path = Path(path)
    if not path.parent.is_dir():
        what = "is a file, not a folder" if path.parent.exists() else "does not exist"
        raise UserError(f"cannot write {path}: folder {path.parent} {what}")
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host_tag()}.{os.getpid()}.", suffix=f".tmp{path.suffix}",
                                   dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    os.close(fd)
    return Path(tmp)


def publish(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, give it the usual file permissions and rename it to ``path`` (then fsync the folder).

    Raises:
        UserError: the flush or rename failed; ``tmp`` is deleted, ``path`` keeps its old content.
    """
    # mkstemp creates files readable by the owner only; outputs should get what the umask gives.
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, exc) from None
    # The rename itself must reach the disk too, or a power cut could bring back the old file.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; renamed to ``path`` on success, deleted on any exception.

    Raises:
        UserError: for an ``OSError`` while writing (disk full, permission, size limit), naming ``path``.
    """
    path = Path(path)
    tmp = temporary_path(path)

    def discard():
        with contextlib.suppress(OSError):
            tmp.unlink()

    with write_errors(path, cleanup=discard, tmp=tmp):
        yield tmp
        publish(tmp, path)


@contextlib.contextmanager
def write_errors(path: str | Path, cleanup: Callable[[], None], tmp: Path | None = None) -> Iterator[None]:
    """On any exception call ``cleanup()`` (delete the temporary); an ``OSError`` becomes a UserError naming ``path``.

    Writers that report a failed write as something else (torch's zip writer raises a bare RuntimeError) are
    recognised by the state of ``tmp``: at the file-size limit, or on a full disk.
    """
    try:
        yield
    except BaseException as exc:
        cause = exc if isinstance(exc, OSError) else _full_or_at_limit(tmp) if isinstance(exc, Exception) else None
        cleanup()
        if cause is not None:
            raise write_error(path, cause) from None
        raise


def _full_or_at_limit(tmp: Path | None) -> OSError | None:
    if tmp is None:
        return None
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and tmp.stat().st_size >= limit - 4096:
            return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        if os.statvfs(tmp.parent).f_bavail == 0:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except (OSError, ImportError):
        pass
    return None


class _RecordingFile(io.IOBase):
    """A binary file that remembers the first OSError of ``write``: torch.save reports it as a bare RuntimeError.

    An ``io.IOBase`` (savers such as torch.export check for one); closing it leaves the real file to its owner.
    """

    def __init__(self, f):
        super().__init__()
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._f.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()


def atomic_write(path: str | Path, write: Callable) -> None:
    """Call ``write(binary_file_object)`` on a temporary file beside ``path``, then rename it into place.

    Raises:
        UserError: the write failed for lack of space, permission or the size limit (the old file is intact).
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        recording = _RecordingFile(f)
        try:
            write(recording)
        except Exception as exc:
            if recording.error is not None and recording.error is not exc:
                raise recording.error from exc
            raise


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (``hashlib.file_digest`` needs Python 3.11; we support 3.10)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
