"""Choose InstanceOptions defaults: V_Rand / V_Info of seeded-watershed instances over a parameter grid.

    python benchmarks/instance_params.py [--data-dir ../shared/isbi2012] [--slices 6] [--blur 2] [--noise 0.15] [--focus]

Stand-in prediction (no trained model is needed): the ISBI 2012 training labels' cell mask blurred
(Gaussian, ``--blur`` px) plus Gaussian noise (sd ``--noise``), clipped to [0, 1]; blurring thins weak
membranes below 0.5 so connected components merge cells, as a real model's gaps do. Rows: plain
4-connected components at 0.5 (the baseline of unet.metrics.segmentation), then every grid point, best V_Rand last.
``--focus`` runs only h-minima seeds, h in 0.2-0.5, smooth 1 and 2, threshold 0.5 (the robustness check).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from scipy import ndimage  # noqa: E402

from common import machine_header  # noqa: E402

from unet.device import setup_device  # noqa: E402
from unet.metrics.instances import score_instances  # noqa: E402
from unet.metrics.cells import label_cells  # noqa: E402
from unet.prediction.instances import InstanceOptions, instance_stack  # noqa: E402

GRID = {"distance": (1.0, 2.0, 3.0, 5.0), "hminima": (0.05, 0.1, 0.2, 0.3)}
FOCUS = {"hminima": (0.2, 0.3, 0.4, 0.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "isbi2012"))
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--blur", type=float, default=2.0)
    parser.add_argument("--noise", type=float, default=0.15)
    parser.add_argument("--focus", action="store_true", help="only the h-minima robustness check")
    args = parser.parse_args()
    print(machine_header("instance_params", setup_device("cpu")))
    truth = tifffile.imread(Path(args.data_dir) / "train-labels.tif")[:args.slices] > 0
    rng = np.random.default_rng(0)
    prob = np.stack([ndimage.gaussian_filter(t.astype(float), args.blur) for t in truth])
    prob = np.clip(prob + rng.normal(0, args.noise, prob.shape), 0, 1)
    cc = score_instances(np.stack([label_cells(p > 0.5) for p in prob]), truth)
    print(f"stand-in: labels blurred {args.blur} px + noise {args.noise}, {len(truth)} slices")
    print("| seeds | seed_h | threshold | smooth | fill | V_Rand | V_Info | s/slice |\n|---|---|---|---|---|---|---|---|")
    print(f"| (connected components) | | 0.5 | | | {cc['v_rand']:.4f} | {cc['v_info']:.4f} | |")
    rows = []
    grid = FOCUS if args.focus else GRID
    thresholds, smooths = ((0.5,), (1.0, 2.0)) if args.focus else ((0.3, 0.5, 0.7), (0.0, 1.0, 2.0))
    for (seeds, hs), th, sm, fill in itertools.product(
            [(s, h) for s, hs in grid.items() for h in hs], thresholds, smooths, (True,)):
        opts = InstanceOptions(threshold=th, seeds=seeds, seed_h=hs, smooth=sm, fill=fill)
        t0 = time.perf_counter()
        sc = score_instances(instance_stack(prob, opts), truth)
        dt = (time.perf_counter() - t0) / len(truth)
        rows.append((sc["v_rand"], sc["v_info"], opts, dt))
        print(f"| {seeds} | {hs} | {th} | {sm} | {fill} | {sc['v_rand']:.4f} | {sc['v_info']:.4f} | {dt:.2f} |", flush=True)
    best = max(rows, key=lambda r: r[0])
    print(f"best V_Rand: {best[2]} -> V_Rand {best[0]:.4f}, V_Info {best[1]:.4f}")
    unfilled = score_instances(instance_stack(prob, replace(best[2], fill=False)), truth)
    print(f"the same with fill=False: V_Rand {unfilled['v_rand']:.4f}, V_Info {unfilled['v_info']:.4f}")
    default = score_instances(instance_stack(prob, InstanceOptions()), truth)
    print(f"InstanceOptions() defaults: V_Rand {default['v_rand']:.4f}, V_Info {default['v_info']:.4f}")


if __name__ == "__main__":
    main()
