"""Cost of the UNet paper's weight map (w0 = 10, sigma = 5) on the ISBI 2012 training labels.

    python benchmarks/weight_map_cost.py [--data-dir ../shared/isbi2012]

Prints the seconds for ``weight_map_stack`` on the 30 512x512 label slices (cells per slice, mean and max
weight) and, on 3 slices, the cost and largest difference of the whole-slice distance transforms
(``reach`` unbounded) that the windowed ones replace.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from common import machine_header  # noqa: E402

from unet.device import setup_device  # noqa: E402
from unet.metrics.cells import label_cells  # noqa: E402
from unet.weight_map import border_weight_map, weight_map_stack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "isbi2012"))
    args = parser.parse_args()
    print(machine_header("weight_map_cost", setup_device("cpu")))
    labels = (tifffile.imread(Path(args.data_dir) / "train-labels.tif") > 0).astype(np.int64)
    t0 = time.perf_counter()
    w = weight_map_stack(labels)
    total = time.perf_counter() - t0
    cells = [int(label_cells(lab == 1).max()) for lab in labels]
    print(f"weight_map_stack {labels.shape}: {total:.1f} s ({total / len(labels):.2f} s per slice), "
          f"{np.mean(cells):.0f} cells per slice (max {max(cells)}), weight mean {w.mean():.3f} max {w.max():.2f}")
    t0 = time.perf_counter()
    full = [border_weight_map(lab == 1, reach=1e9) for lab in labels[:3]]
    t_full = (time.perf_counter() - t0) / 3
    diff = max(float(np.abs(f - border_weight_map(lab == 1)).max()) for f, lab in zip(full, labels[:3]))
    print(f"whole-slice distance transforms: {t_full:.2f} s per slice; largest difference {diff:.2e}")


if __name__ == "__main__":
    main()
