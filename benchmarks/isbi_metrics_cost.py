"""Cost of the ISBI challenge scores (thinning + threshold sweep) on a 30 x 512 x 512 stack.

    python benchmarks/isbi_metrics_cost.py [--data-dir ../shared/isbi2012] [--slices 30]

The proposal is the true cell mask blurred (Gaussian, sigma 2 px) plus Gaussian noise (sd 0.15), clipped
to [0, 1]: membranes of realistic width and noise, so the flood has realistic work. Prints the seconds for
the 11-threshold thinned scores of the stack, the per-slice cost of the parts, and how often
``skimage.segmentation.watershed(..., watershed_line=True)`` (the obvious library substitute) places dams
differently from Fiji's flood, with the score it would give.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from scipy import ndimage  # noqa: E402
from skimage.segmentation import watershed  # noqa: E402

from common import machine_header  # noqa: E402

from unet.device import setup_device  # noqa: E402

from unet.metrics.fiji_watershed import thin_boundaries  # noqa: E402
from unet.metrics.isbi import FIJI_THRESHOLDS, fiji_slice_scores, isbi_thinned_scores  # noqa: E402
from unet.metrics.cells import label_cells  # noqa: E402


def skimage_thinning(cell_mask: np.ndarray) -> np.ndarray:
    """The library alternative: flood the membrane plateau from the cell components, with lines."""
    return watershed(~cell_mask, markers=label_cells(cell_mask), connectivity=1, watershed_line=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "isbi2012"))
    parser.add_argument("--slices", type=int, default=30)
    args = parser.parse_args()
    print(machine_header("isbi_metrics_cost", setup_device("cpu")))
    truth = tifffile.imread(Path(args.data_dir) / "train-labels.tif")[:args.slices] > 0
    rng = np.random.default_rng(0)
    prob = np.stack([ndimage.gaussian_filter(t.astype(float), 2) for t in truth])
    prob = np.clip(prob + rng.normal(0, 0.15, prob.shape), 0, 1)

    t0 = time.perf_counter()
    out = isbi_thinned_scores(prob, truth)
    total = time.perf_counter() - t0
    print(f"stack {truth.shape}: {len(FIJI_THRESHOLDS)} thresholds, {total:.1f} s "
          f"({total / truth.shape[0]:.2f} s per slice)")
    print(f"  v_rand_thinned {out['v_rand_thinned']:.4f} at {out['v_rand_threshold']!r}, "
          f"v_info_thinned {out['v_info_thinned']:.4f} at {out['v_info_threshold']!r}")

    t_thin = t_score = t_sk = 0.0
    diff_px, sk_rand = [], []
    th = out["v_rand_threshold"]
    for p, t in zip(prob, truth):
        mask = p > th
        t0 = time.perf_counter()
        ours = thin_boundaries(mask)
        t1 = time.perf_counter()
        fiji_slice_scores(label_cells(t), ours)
        t2 = time.perf_counter()
        sk = skimage_thinning(mask)
        t3 = time.perf_counter()
        t_thin, t_score, t_sk = t_thin + t1 - t0, t_score + t2 - t1, t_sk + t3 - t2
        diff_px.append(int(np.count_nonzero((ours == 0) != (sk == 0))))
        sk_rand.append(fiji_slice_scores(label_cells(t), sk)[0])
    n = truth.shape[0]
    print(f"  per slice at th={th!r}: thinning {1e3 * t_thin / n:.0f} ms, scores {1e3 * t_score / n:.0f} ms, "
          f"skimage watershed {1e3 * t_sk / n:.0f} ms")
    print(f"  skimage watershed_line vs Fiji's dams: {np.mean(diff_px):.0f} pixels differ per slice "
          f"(min {min(diff_px)}, max {max(diff_px)}); V_Rand with skimage's thinning {np.mean(sk_rand):.4f} "
          f"vs Fiji's {out['v_rand_curve'][FIJI_THRESHOLDS.index(th)]:.4f}")


if __name__ == "__main__":
    main()
