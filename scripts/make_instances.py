"""Instance labels from binary cell labels: one id per cell (issue 21's instance-label experiment).

    python scripts/make_instances.py --labels ../shared/isbi2012/train-labels.tif --output instances.tif

Each slice's cells (label 255 or 1) become their 4-connected components, as the ISBI 2012 scripts count them
(unet.metrics.cells.label_cells); ids run on through the stack, so no two cells share one; membrane pixels stay 0.
Train on the result with ``--label-kind instances``: the membrane map it trains on is the binary labels again
(unet.data.labels.instance_membrane_target). uint16, or uint32 above 65535 cells; written to a temporary file
and renamed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from unet.atomic import atomic_path  # noqa: E402
from unet.errors import UserError  # noqa: E402
from unet.io.writers import label_dtype, shift_labels  # noqa: E402
from unet.metrics.cells import label_cells  # noqa: E402


def instance_stack_of(binary: np.ndarray, output: str) -> np.ndarray:
    """``(N, H, W)`` binary labels (0 = membrane, anything else = cell) -> ids unique over the stack."""
    out, max_id = [], 0
    for cells in binary != 0:
        ids, max_id = shift_labels(label_cells(cells), max_id, output)
        out.append(ids)
    return np.stack(out).astype(label_dtype(max_id))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", required=True, help="binary label stack (TIFF): 0 = membrane, 255 or 1 = cell")
    p.add_argument("--output", required=True, help="instance label stack to write (TIFF)")
    args = p.parse_args(argv)
    binary = tifffile.imread(args.labels)
    binary = binary[None] if binary.ndim == 2 else binary
    values = np.unique(binary)
    if binary.ndim != 3 or not set(values.tolist()) <= {0, 1, 255}:
        p.exit(2, f"{p.prog}: error: {args.labels}: not binary labels (values {values[:6].tolist()}, shape "
                  f"{binary.shape}); expected 0 = membrane and 255 or 1 = cell\n")
    try:
        instances = instance_stack_of(binary, args.output)
        with atomic_path(Path(args.output)) as tmp:
            tifffile.imwrite(tmp, instances, photometric="minisblack", compression="zlib")
    except UserError as e:  # too many cells for uint32, or the output's folder does not exist: one line, nothing written
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"wrote {args.output}: {int(instances.max())} cells in {len(binary)} slices ({instances.dtype}); "
          f"train with --label-kind instances")
    return 0


if __name__ == "__main__":
    sys.exit(main())
