"""How far the default precision's results are from fp32's: issue 22's bounds (masks differ on <= 0.1 % of pixels,
dice_nvidia and thinned V_Rand within 0.002), from two infer.py runs and two evaluate.py runs of one model.

    python benchmarks/precision_agreement.py M_FP32.tif P_FP32.tif M_OTHER.tif P_OTHER.tif EVAL_FP32.json \\
        EVAL_OTHER.json [--fold 0] [--json OUT]

The masks/probabilities are whole ISBI stacks (30 slices); the share of differing mask pixels is given over the
stack and over the fold's held-out slices (disjoint scheme, 5 folds), the metrics are evaluate.py's on that fold.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from common import write_json  # noqa: E402

from unet.data.folds import fold_indices  # noqa: E402

METRICS = ("dice_nvidia", "v_rand_thinned", "v_info_thinned", "v_rand_instances", "pixel_error")
BOUNDS = {"mask_pixels_differ_pct": 0.1, "dice_nvidia": 0.002, "v_rand_thinned": 0.002}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("masks_fp32", "probs_fp32", "masks_other", "probs_other", "eval_fp32", "eval_other"):
        p.add_argument(name, type=Path)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args(argv)
    m32, m = tifffile.imread(args.masks_fp32), tifffile.imread(args.masks_other)
    p32, pr = tifffile.imread(args.probs_fp32).astype(np.float64), tifffile.imread(args.probs_other).astype(np.float64)
    held_out = fold_indices(len(m32), args.fold)[1]
    row = {"mask_pixels_differ_pct": 100 * float(np.mean(m32 != m)),
           "mask_pixels_differ_pct_held_out": 100 * float(np.mean(m32[held_out] != m[held_out])),
           "prob_diff_max": float(np.abs(p32 - pr).max()), "prob_diff_mean": float(np.abs(p32 - pr).mean())}
    e32, e = (json.loads(path.read_text())["metrics"] for path in (args.eval_fp32, args.eval_other))
    for key in METRICS:
        if key in e32 and key in e:
            row[key] = {"fp32": e32[key], "other": e[key], "difference": e[key] - e32[key]}
    print(f"mask pixels that differ: {row['mask_pixels_differ_pct']:.4f} % of the stack, "
          f"{row['mask_pixels_differ_pct_held_out']:.4f} % of fold {args.fold}'s held-out slices {list(held_out)}")
    print(f"probability difference: max {row['prob_diff_max']:.4g}, mean {row['prob_diff_mean']:.4g}")
    for key in METRICS:
        if key in row:
            print(f"{key:18} fp32 {row[key]['fp32']:.5f}  other {row[key]['other']:.5f}  "
                  f"difference {row[key]['difference']:+.5f}")
    within = (row["mask_pixels_differ_pct"] <= BOUNDS["mask_pixels_differ_pct"]
              and all(abs(row[k]["difference"]) <= BOUNDS[k] for k in ("dice_nvidia", "v_rand_thinned") if k in row))
    print(f"within issue 22's bounds (masks <= 0.1 %, dice_nvidia and thinned V_Rand within 0.002): {within}")
    write_json(args.json, {"benchmark": "precision_agreement", "row": row, "within_bounds": within})
    return 0


if __name__ == "__main__":
    sys.exit(main())
