"""Cost of the input checks: finiteness of a float stack, page completeness of a TIFF, finite checkpoint weights.

    python benchmarks/input_checks.py [--repeats 5]

Prints the median time of each check next to the read it is part of (30 float32 slices of 512 x 512 written
to a temporary folder; the reference UNet's checkpoint, 34.5 M parameters).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unet import checkpoint  # noqa: E402
from unet.io import images as io  # noqa: E402
from unet.model import UNet  # noqa: E402


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        stack = Path(tmp) / "float.tif"
        arr = np.random.default_rng(0).random((30, 512, 512), dtype=np.float32)
        tifffile.imwrite(stack, arr, photometric="minisblack")
        read = median_s(lambda: io.read_stack(stack), args.repeats)
        finite = median_s(lambda: io.check_finite(arr, stack), args.repeats)

        def pages():
            with tifffile.TiffFile(stack) as tif:
                io._check_pages_complete(tif, stack)
        complete = median_s(pages, args.repeats)
        print(f"30 x 512 x 512 float32 stack: read_stack {read * 1e3:.1f} ms, of which finiteness "
              f"{finite * 1e3:.1f} ms and page completeness {complete * 1e3:.2f} ms")
        ckpt_path = Path(tmp) / "ref.pt"
        checkpoint.save_checkpoint(ckpt_path, UNet())
        load = median_s(lambda: checkpoint.load_checkpoint(ckpt_path), args.repeats)
        state = torch.load(ckpt_path, weights_only=True)["model"]
        weights = median_s(lambda: checkpoint._check_finite_weights(state, ckpt_path), args.repeats)
        print(f"reference checkpoint (34.5 M parameters): load_checkpoint {load * 1e3:.1f} ms, of which finite "
              f"weights {weights * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
