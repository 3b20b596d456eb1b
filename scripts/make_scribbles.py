"""Sparse scribble labels from dense ones, reproducibly (issue 21's sparse-training experiment).

    python scripts/make_scribbles.py --labels ../shared/isbi2012/train-labels.tif --output scribbles.tif \
        [--fraction 0.05] [--ignore 128] [--seed 0]

Keeps a few strokes per class along each class's skeleton (unet.data.scribbles) on at most --fraction of every
slice's pixels and sets the rest to --ignore; train on the result with ``--ignore-label <ignore>``. Prints the
labelled share per class. The output is written to a temporary file and renamed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from unet.atomic import atomic_path  # noqa: E402
from unet.data.scribbles import scribble_stack  # noqa: E402
from unet.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", required=True, help="dense label stack (TIFF)")
    p.add_argument("--output", required=True, help="scribble label stack to write (TIFF)")
    p.add_argument("--fraction", type=float, default=0.05, help="most share of each slice's pixels kept")
    p.add_argument("--ignore", type=int, default=128, help="value of the unlabelled pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    dense = tifffile.imread(args.labels)
    dense = dense[None] if dense.ndim == 2 else dense
    try:
        sparse = scribble_stack(dense, args.fraction, args.ignore, args.seed)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {args.labels}: {e}\n")
    try:
        with atomic_path(Path(args.output)) as tmp:
            tifffile.imwrite(tmp, sparse, photometric="minisblack", compression="zlib")
    except UserError as e:  # e.g. the output's folder does not exist: one line, nothing written
        p.exit(2, f"{p.prog}: error: {e}\n")
    kept = sparse != args.ignore
    shares = ", ".join(f"class {c}: {np.mean(sparse == c):.2%}" for c in np.unique(dense))
    print(f"wrote {args.output}: {kept.mean():.2%} of {dense.size} pixels labelled ({shares}); "
          f"train with --ignore-label {args.ignore}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
