"""Download the ISBI 2012 EM segmentation challenge stacks and check them.

    python datasets/isbi2012.py --data-dir data/isbi2012

Fetches train-volume.tif, train-labels.tif and test-volume.tif (30 slices of 512 x 512 each) from the
challenge site (the URLs NVIDIA's UNet_Medical download script uses), writes each atomically (temporary
file, then rename) and checks it with the same reader training uses. Files already present and valid are
kept. Terms: free for non-commercial segmentation research; cite Cardona et al. 2010 and
Arganda-Carreras et al. 2015. Exit status 2 with a one-line message on any failure.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unet.atomic import atomic_path  # noqa: E402
from unet.data.io import stack_info  # noqa: E402
from unet.errors import UserError  # noqa: E402

BASE_URL = "http://brainiac2.mit.edu/isbi_challenge/sites/default/files/"
FILES = ("train-volume.tif", "train-labels.tif", "test-volume.tif")
EXPECTED = (30, 512, 512)
TIMEOUT_S = 60


def check_stack(path: Path, shown: str | None = None) -> None:
    """Raise UserError (naming ``shown``, default ``path``) unless ``path`` is a 30 x 512 x 512 grayscale stack."""
    try:
        n, h, w, c, _ = stack_info(path)
    except UserError as exc:
        if shown is None:
            raise
        raise UserError(str(exc).replace(str(path), shown)) from exc
    if (n, h, w) != EXPECTED or c != 1:
        raise UserError(f"{shown or path}: has {n} slices of {w}x{h} with {c} channel(s), expected "
                        f"{EXPECTED[0]} slices of {EXPECTED[2]}x{EXPECTED[1]} grayscale; check the mirror or download again")


def download(url: str, dest: Path, opener=urllib.request.urlopen) -> None:
    """Fetch ``url`` into ``dest`` atomically; the partial file never appears under the final name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file keeps the .tif suffix, so the reader accepts it; it is checked before the rename.
    with atomic_path(dest) as tmp:
        try:
            with open(tmp, "wb") as out, opener(url, timeout=TIMEOUT_S) as response:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise UserError(f"{url}: download failed ({' '.join(str(reason).split())}); check the internet "
                            f"connection, or fetch the file by hand into {dest.parent}") from exc
        check_stack(tmp, shown=url)


def fetch_all(data_dir: Path, base_url: str = BASE_URL, opener=urllib.request.urlopen) -> list[Path]:
    """Download whichever of the three stacks are missing or invalid; returns their paths."""
    paths = []
    for name in FILES:
        dest = data_dir / name
        try:
            if dest.exists():
                check_stack(dest)
                paths.append(dest)
                continue
        except UserError:
            pass  # a bad local copy is replaced below
        download(base_url.rstrip("/") + "/" + name, dest, opener)
        paths.append(dest)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, type=Path, help="folder to put the three .tif stacks in")
    parser.add_argument("--base-url", default=BASE_URL, help="mirror to download from (default: challenge site)")
    args = parser.parse_args(argv)
    try:
        paths = fetch_all(args.data_dir, args.base_url)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"ok {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
