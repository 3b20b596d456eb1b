"""Write a synthetic EM set to TIFF stacks, with 2 classes (membrane, cell) or 3 (membrane, cytoplasm,
organelle): data to train on with train.py's own-data options (issue 21's multi-class and pre-training runs).

    python scripts/make_synthetic.py --output synthetic3/ --classes 3 [--count 30] [--size 256] [--seed 0]
    python scripts/make_synthetic.py --output neuropil/ --style neuropil --classes 2 --count 40 --size 512

``--style cells`` (default) is the built-in set's look; ``--style neuropil`` imitates ISBI-like neuropil
(unet/data/neuropil.py).

Writes ``images.tif`` (uint8) and ``labels.tif`` (2 classes: 0 = membrane, 255 = cell; 3 classes: class indices
0, 1, 2) into --output, each to a temporary file renamed when complete, and prints each class's share.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from unet.atomic import atomic_path  # noqa: E402
from unet.data.synthetic import STYLES, make_synthetic_em  # noqa: E402
from unet.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="folder to write images.tif and labels.tif into")
    p.add_argument("--classes", type=int, default=3, choices=(2, 3))
    p.add_argument("--count", type=int, default=30)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", default="cells", choices=tuple(STYLES))
    args = p.parse_args(argv)
    try:
        images, labels = make_synthetic_em(args.count, args.size, args.size, args.seed, classes=args.classes,
                                           style=args.style)
    except UserError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for name, stack in (("images.tif", images), ("labels.tif", labels)):
            with atomic_path(out / name) as tmp:
                tifffile.imwrite(tmp, stack, photometric="minisblack", compression="zlib")
    except UserError as e:  # a failed write: one line
        p.exit(2, f"{p.prog}: error: {e}\n")
    shares = ", ".join(f"{v}: {np.mean(labels == v):.1%}" for v in np.unique(labels))
    print(f"wrote {out / 'images.tif'} and {out / 'labels.tif'}: {args.count} slices of {args.size}x{args.size}, "
          f"({args.style}), label shares {shares}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
