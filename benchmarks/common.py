"""Helpers shared by the benchmark scripts: machine header, model configs, MFU peaks, tables, JSON."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from unet import run_log  # noqa: E402

from unet.evaluation import tables  # noqa: E402
from unet.benchmarking import PRECISION_DTYPES, cpu_theoretical_peak, measure_cpu_kernels, peak_source  # noqa: E402
from unet.device import DeviceSetup, cpu_name, setup_device, usable_cpus  # noqa: E402
from unet.errors import UserError  # noqa: E402
from unet.model import UNet  # noqa: E402

PRECISIONS = tuple(PRECISION_DTYPES)
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: its constructor arguments and the square input size it is fed."""

    name: str
    kwargs: dict
    input_size: int

    def build(self) -> UNet:
        return UNet(**self.kwargs)


# reference = NVIDIA UNet_Medical (572 -> 388); small = the cheap 'same' model used for CPU experiments.
MODELS = {
    "reference": ModelSpec("reference", {}, 572),
    "small": ModelSpec("small", {"base_filters": 16, "padding": "same"}, 256),
}
# --quick: the small architecture at 64x64 so a smoke run takes seconds.
QUICK_MODEL = ModelSpec("small", {"base_filters": 16, "padding": "same"}, 64)


def csv_list(text: str, cast=str) -> list:
    """'1,8' -> [1, 8] (for argparse ``type=``)."""
    return [cast(t.strip()) for t in text.split(",") if t.strip()]


def machine_header(title: str, dev: DeviceSetup) -> str:
    """One comment line saying what ran where and when: device, CPU, cores, threads, torch, date."""
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    accel = f"device: {dev.name()} ({dev.type})  " if dev.type != "cpu" else "device: cpu  "
    line = (f"# {title}  {now}  {accel}cpu: {cpu_name()}  cores: {usable_cpus()}  "
            f"torch threads: {torch.get_num_threads()}  torch {torch.__version__}  python {platform.python_version()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * usable_cpus():
        # Other work on the cores slows every row unpredictably (tiny inputs with 2+ threads: up to 60x).
        line += (f"\n# WARNING: 1-minute load average {load:.1f} on {usable_cpus()} cores: the machine is busy, "
                 f"figures may be unreliable")
    return line


def machine_record(dev: DeviceSetup) -> dict:
    """The machine as a JSON-able dict (for --json outputs)."""
    return {"device_type": dev.type, "device": dev.name(), "cpu": cpu_name(), "cores": usable_cpus(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def device_for(name: str, precision: str) -> DeviceSetup:
    """A DeviceSetup with autocast for ``precision`` (fp32 = autocast off); a bad choice exits with its message."""
    try:
        return setup_device(name, amp=precision != "fp32", amp_dtype=None if precision == "fp32" else precision)
    except UserError as e:  # one line and status 2, as the project's own CLIs report it
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def usable_precisions(requested: list[str], device_type: str) -> tuple[list[str], list[str]]:
    """Split requested precisions into (run, skipped-with-reason): fp16 autocast is for CUDA/NPU only."""
    run, skipped = [], []
    for p in requested:
        if p not in PRECISIONS:
            raise SystemExit(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
        if p == "fp16" and device_type == "cpu":
            skipped.append("fp16 skipped: fp16 autocast is only benchmarked on cuda/npu")
        else:
            run.append(p)
    return run, skipped


def add_peak_args(p: argparse.ArgumentParser) -> None:
    """The MFU peak options, the same in every script."""
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default: measured on CPU; the 16-bit datasheet peak elsewhere, none for fp32)")
    p.add_argument("--peak-seconds", type=float, default=2.0,
                   help="seconds per dtype for each CPU peak measurement (before and after the rows)")


class MfuPeaks:
    """The peaks a benchmark's MFU column is computed against, and the JSON record of them.

    CPU: the best dense kernel (matmul or 3x3 conv) per precision, measured in this run under the same load
    and thread count as the rows: once before them (used while they run) and once after (:meth:`finish`).
    On a shared machine one measurement can land in a busy moment; the higher one is closer to what the cores
    can do, so MFU is never flattered by a low peak. Accelerators, or ``--peak-tflops``: nothing measured.
    """

    def __init__(self, dev: DeviceSetup, precisions: list[str], args: argparse.Namespace):
        self.given = args.peak_tflops
        self.measured = dev.type == "cpu" and not self.given
        self.precisions = precisions
        self.seconds, self.size = (0.2, 1024) if args.quick else (args.peak_seconds, 2048)
        self.kernels: dict[str, dict[str, float]] = {}
        # The ceiling the measured kernels are read against (never used for MFU: no kernel reaches it).
        self.theoretical = cpu_theoretical_peak() if dev.type == "cpu" else None
        if self.theoretical:
            print(f"# {self.theoretical['description']}")
        self.cpu = self._measure(self.kernels) if self.measured else {}
        if self.given:
            print(f"# MFU peak: given {self.given} TFLOP/s")
        elif not self.measured:
            peak = dev.peak_flops("bf16")
            print(f"# MFU peak: {peak / 1e12:.0f} TFLOP/s (datasheet, 16-bit dense; fp32 rows get none)" if peak
                  else "# MFU peak: unknown device, pass --peak-tflops")

    def _measure(self, kernels: dict | None = None) -> dict[str, float]:
        peaks = {}
        for p in self.precisions:
            flops = measure_cpu_kernels(PRECISION_DTYPES[p], self.seconds, self.size, windows=3)
            peaks[p] = max(flops.values())
            if kernels is not None:
                kernels[p] = {f"{name}_tflops": v / 1e12 for name, v in flops.items()}
        return peaks

    def fields(self, dev: DeviceSetup, precision: str, achieved_flops: float) -> dict:
        """A row's achieved TFLOP/s, peak, peak source and MFU."""
        peak, source = peak_source(dev, precision, self.cpu, self.given)
        return {"achieved_tflops": achieved_flops / 1e12, "peak_tflops": peak / 1e12 if peak else None,
                "peak_source": source, "mfu": achieved_flops / peak if peak else None}

    def finish(self, rows: list[dict]) -> None:
        """Measure the CPU peaks again after the rows, print both, and re-base the rows' MFU on the higher."""
        if not self.measured:
            return
        after = self._measure()
        print("# MFU peak = best dense kernel (matmul or 3x3 conv) measured this run, before / after the rows: "
              + ", ".join(f"{p} {self.cpu[p] / 1e12:.3f} / {after[p] / 1e12:.3f} TFLOP/s" for p in self.cpu)
              + self._of_theory(after))
        self.cpu = {p: max(self.cpu[p], after[p]) for p in self.cpu}
        for r in rows:
            peak = self.cpu.get(r.get("precision"))
            if peak and "achieved_tflops" in r:
                r["peak_tflops"] = peak / 1e12
                r["mfu"] = r["achieved_tflops"] * 1e12 / peak

    def _of_theory(self, after: dict[str, float]) -> str:
        """'; theoretical fp32 0.333 TFLOP/s (measured 85 %)' for the printed peak line."""
        parts = [f"{p} {self.theoretical[p] / 1e12:.3f} TFLOP/s (measured "
                 f"{max(self.cpu[p], after[p]) / self.theoretical[p]:.0%})"
                 for p in self.cpu if self.theoretical and self.theoretical.get(p)]
        return f"; theoretical {', '.join(parts)}" if parts else ""

    def record(self) -> dict:
        """The CPU peaks and their kernels' readings, for the JSON output."""
        theory = ({p: self.theoretical[p] / 1e12 if self.theoretical[p] else None for p in ("fp32", "bf16")}
                  if self.theoretical else None)
        return {"cpu_peaks_tflops": {p: v / 1e12 for p, v in self.cpu.items()}, "cpu_peak_kernels": self.kernels,
                "cpu_theoretical_peak_tflops": theory}


def fmt(value, spec: str = ".1f") -> str:
    """A table cell: numbers formatted, None as n/a (unet.evaluation.tables.fmt, the package's one formatter)."""
    return tables.fmt(value, spec, missing="n/a")


def print_table(columns: list[tuple[str, str]], rows: list[dict]) -> None:
    """Print rows as an aligned text table; ``columns`` are (key, title) pairs; formats per column below."""
    specs = {"images_per_s": ".2f", "slices_per_s": ".3f", "step_ms": ".1f", "peak_memory_mb": ".0f",
             "gflop_per_image": ".1f", "achieved_tflops": ".3f", "mfu": ".1%", "ms_per_batch": ".1f"}
    cells = [[fmt(r.get(k), specs.get(k, ".3g")) for k, _ in columns] for r in rows]
    widths = [max([len(t)] + [len(c[i]) for c in cells]) for i, (_, t) in enumerate(columns)]
    print("  ".join(t.rjust(w) for (_, t), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)), flush=True)


def write_json(path: str | Path | None, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically, NaN/inf as null (no-op for None)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    run_log.write_json(path, payload)
    print(f"# wrote {path}")
