"""infer.py's defaults against the settings they replaced, end to end, each run in its own process.

    python benchmarks/infer_defaults.py [--parts slices,stacks] [--sizes 4096,8192] [--slices 100] [--json OUT]

slices: one synthetic slice of each --sizes (the small model the issue measured: base 8, 'same'), infer.py
    with the old default (fewest-FLOP tiles in half the free memory: --tile-plan flops), with
    --tile-plan flops --memory-budget-mb 500, and with today's default (--tile-plan speed).
stacks: a --slices x 512x512 stack, both benchmark models (reference: valid 572 tiles, 64 filters; small: base
    16 'same'), infer.py with --precision fp32, with the default precision (auto: bf16 where the chip has it),
    and with --backend openvino when OpenVINO is installed.

Every row is a fresh ``python infer.py`` process (random weights, seed 0); wall seconds include start-up and
the tile-plan probe, "stream" is infer.py's own figure for reading, predicting and writing, and peak RSS is the
process's high-water mark (``ru_maxrss``).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

from common import MODELS, REPO, csv_list, device_for, machine_header, write_json  # noqa: E402

from unet.checkpoint import save_checkpoint  # noqa: E402
from unet.model import UNet  # noqa: E402
from unet.prediction.openvino_forward import openvino_version  # noqa: E402

# Runs infer.py's main in this process and prints its peak RSS when it ends (Linux: ru_maxrss in KiB).
WRAPPER = ("import resource, runpy, sys; sys.argv = ['infer.py'] + sys.argv[1:]\n"
           "try:\n    runpy.run_path(%r, run_name='__main__')\n"
           "finally:\n    print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")


def run_infer(args: list[str]) -> dict:
    """One infer.py process: wall seconds, infer.py's streaming seconds, peak RSS, the tile plan it printed."""
    cmd = [sys.executable, "-c", WRAPPER % str(REPO / "infer.py"), *args, "--no-progress", "--overwrite"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"infer.py {' '.join(args)} failed: {out.strip()[-500:]}")
    stream = re.search(r"done: (\d+) slices in ([\d.]+) s", out)
    rss = re.search(r"peak_rss_kib (\d+)", out)
    plan = re.search(r"tile plan \S+ (.*)", out)
    return {"wall_s": wall, "stream_s": float(stream.group(2)), "slices": int(stream.group(1)),
            "peak_rss_mb": int(rss.group(1)) / 1024, "plan": plan.group(1) if plan else ""}


def checkpoint(tmp: Path, name: str, **kwargs) -> Path:
    torch.manual_seed(0)
    path = tmp / f"{name}.pt"
    save_checkpoint(path, UNet(**kwargs))
    return path


def slices_part(tmp: Path, sizes: list[int]) -> list[dict]:
    ckpt = checkpoint(tmp, "small8", base_filters=8, padding="same")
    settings = {"old default (--tile-plan flops)": ["--tile-plan", "flops"],
                "--tile-plan flops --memory-budget-mb 500": ["--tile-plan", "flops", "--memory-budget-mb", "500"],
                "default (--tile-plan speed)": []}
    rows = []
    for size in sizes:
        image = tmp / f"slice{size}.tif"
        tifffile.imwrite(image, np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8))
        for label, extra in settings.items():
            r = run_infer(["--ckpt", str(ckpt), "--input", str(image), "--output", str(tmp / "m.tif"), *extra])
            rows.append({"part": "slices", "size": size, "setting": label, **r})
            print(f"  {size}x{size}  {label:42} wall {r['wall_s']:6.1f} s  stream {r['stream_s']:6.1f} s  "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB  {r['plan']}", flush=True)
        image.unlink()
    return rows


def stacks_part(tmp: Path, slices: int) -> list[dict]:
    stack = tmp / "stack.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).integers(0, 256, (slices, 512, 512), dtype=np.uint8),
                     photometric="minisblack")
    settings = {"--precision fp32": ["--precision", "fp32"], "default precision": []}
    if openvino_version():
        settings["--backend openvino"] = ["--backend", "openvino"]
    rows = []
    for name in ("reference", "small"):
        ckpt = checkpoint(tmp, name, **MODELS[name].kwargs)
        for label, extra in settings.items():
            r = run_infer(["--ckpt", str(ckpt), "--input", str(stack), "--output", str(tmp / "m.tif"), *extra])
            rows.append({"part": "stacks", "model": name, "setting": label, **r,
                         "slices_per_s": r["slices"] / r["stream_s"]})
            print(f"  {name:9}  {label:20} {r['slices']} slices: stream {r['stream_s']:6.1f} s = "
                  f"{rows[-1]['slices_per_s']:6.2f} slices/s  wall {r['wall_s']:6.1f} s  peak RSS "
                  f"{r['peak_rss_mb']:6.0f} MB", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", type=csv_list, default=["slices", "stacks"])
    p.add_argument("--sizes", type=lambda s: csv_list(s, int), default=[4096, 8192])
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args(argv)
    print(machine_header("infer.py defaults", device_for("cpu", "fp32")))
    print(f"# openvino: {openvino_version() or 'not installed'}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "slices" in args.parts:
            rows += slices_part(Path(tmp), args.sizes)
        if "stacks" in args.parts:
            rows += stacks_part(Path(tmp), args.slices)
    write_json(args.json, {"benchmark": "infer_defaults", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
