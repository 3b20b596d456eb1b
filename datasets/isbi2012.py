"""Download the ISBI 2012 EM segmentation challenge stacks and check them.

    python datasets/isbi2012.py --data-dir data/isbi2012

Fetches train-volume.tif, train-labels.tif and test-volume.tif (30 slices of 512 x 512 each) from the
challenge site (the URLs NVIDIA's UNet_Medical download script uses), writes each atomically (temporary
file, then rename) and checks it with the same reader training uses; at most 64 MiB are read per file. Prints the
SHA-256 of each stack; ``--sha256 NAME=HEX`` (repeatable) refuses a stack with another digest. Files already
present, valid (and matching) are kept. Terms: free for non-commercial segmentation research; cite Cardona et al. 2010 and
Arganda-Carreras et al. 2015. Exit status 2 with a one-line message on any failure.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unet.atomic import atomic_path, file_sha256, make_folder, write_error  # noqa: E402
from unet.io.images import stack_info  # noqa: E402
from unet.errors import UserError  # noqa: E402

BASE_URL = "http://brainiac2.mit.edu/isbi_challenge/sites/default/files/"
FILES = ("train-volume.tif", "train-labels.tif", "test-volume.tif")
EXPECTED = (30, 512, 512)
TIMEOUT_S = 60
MAX_BYTES = 64 * 2 ** 20  # each stack is ~8 MiB; a mirror sending more is refused before it fills the disk
CHUNK_BYTES = 2 ** 20


def check_stack(path: Path, shown: str | None = None) -> None:
    """Raise UserError (naming ``shown``, default ``path``) unless ``path`` is a 30 x 512 x 512 grayscale stack."""
    try:
        info = stack_info(path)
    except UserError as exc:
        if shown is None:
            raise
        raise UserError(str(exc).replace(str(path), shown)) from exc
    n, h, w, c = info.num_slices, info.height, info.width, info.channels
    if (n, h, w) != EXPECTED or c != 1:
        raise UserError(f"{shown or path}: has {n} slices of {w}x{h} with {c} channel(s), expected "
                        f"{EXPECTED[0]} slices of {EXPECTED[2]}x{EXPECTED[1]} grayscale; check the mirror or download again")


def download(url: str, dest: Path, opener=urllib.request.urlopen, sha256: str | None = None) -> str:
    """Fetch ``url`` into ``dest`` atomically and return its SHA-256; the partial file never appears as ``dest``.

    Raises:
        UserError: the download failed, exceeded :data:`MAX_BYTES`, did not match ``sha256``, is not a valid
            stack, or ``dest`` could not be written (the old ``dest``, if any, is then left as it was).
    """
    # The temporary file keeps the .tif suffix, so the reader accepts it; it is checked before the rename.
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out:
            try:
                with opener(url, timeout=TIMEOUT_S) as response:
                    digest = _copy_capped(response, out, url, dest)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise UserError(f"{url}: download failed ({' '.join(str(reason).split())}); check the internet "
                                f"connection, or fetch the file by hand into {dest.parent}") from exc
        if sha256 is not None and digest != sha256:
            raise UserError(f"{url}: SHA-256 is {digest}, not the {sha256} given with --sha256; "
                            f"the file was not kept")
        check_stack(tmp, shown=url)
    return digest


def _copy_capped(response, out, url: str, dest: Path) -> str:
    """Copy ``response`` to ``out`` in chunks, at most MAX_BYTES; returns the SHA-256 of what was copied.

    A failure to write (disk full, size limit) is reported against ``dest``, not as a download failure.
    """
    digest, total = hashlib.sha256(), 0
    while chunk := response.read(CHUNK_BYTES):
        total += len(chunk)
        if total > MAX_BYTES:
            raise UserError(f"{url}: more than {MAX_BYTES:,} bytes; an ISBI 2012 stack is about 8 MB, "
                            f"check the mirror (nothing was kept)")
        digest.update(chunk)
        try:
            out.write(chunk)
        except OSError as exc:
            raise write_error(dest, exc) from None
    return digest.hexdigest()


def fetch_all(data_dir: Path, base_url: str = BASE_URL, opener=urllib.request.urlopen,
              sha256: dict[str, str] | None = None) -> list[tuple[Path, str]]:
    """Download whichever of the three stacks are missing, invalid or (with ``sha256``) different.

    Returns:
        ``(path, SHA-256)`` of each of the three stacks, as saved.
    """
    created = not data_dir.exists()
    make_folder(data_dir, "--data-dir")
    try:
        return _fetch_each(data_dir, base_url, opener, sha256 or {})
    except BaseException:
        if created:  # leave no empty folder behind a failed first download
            with contextlib.suppress(OSError):
                data_dir.rmdir()
        raise


def _fetch_each(data_dir: Path, base_url: str, opener, sha256: dict[str, str]) -> list[tuple[Path, str]]:
    saved = []
    for name in FILES:
        dest = data_dir / name
        if dest.is_file():
            try:
                check_stack(dest)
                digest = file_sha256(dest)
                if sha256.get(name, digest) == digest:
                    saved.append((dest, digest))
                    continue
            except (UserError, OSError):
                pass  # a bad local copy is replaced below (atomically: it stays until a good one is in)
        digest = download(base_url.rstrip("/") + "/" + name, dest, opener, sha256.get(name))
        saved.append((dest, digest))
    return saved


def _sha256_arg(text: str) -> tuple[str, str]:
    name, sep, digest = text.partition("=")
    digest = digest.strip().lower()
    if not sep or name not in FILES or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise argparse.ArgumentTypeError(f"expected NAME=HEX with NAME one of {', '.join(FILES)} and 64 hex "
                                         f"digits, got {text!r}")
    return name, digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, type=Path, help="folder to put the three .tif stacks in")
    parser.add_argument("--base-url", default=BASE_URL, help="mirror to download from (default: challenge site)")
    parser.add_argument("--sha256", type=_sha256_arg, action="append", default=[], metavar="NAME=HEX",
                        help="expected SHA-256 of one stack (repeat for each); a stack that differs is not kept")
    args = parser.parse_args(argv)
    try:
        saved = fetch_all(args.data_dir, args.base_url, sha256=dict(args.sha256))
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for path, digest in saved:
        print(f"ok {path} sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
