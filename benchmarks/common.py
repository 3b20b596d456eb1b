"""Helpers shared by the benchmark scripts: machine header, model configs, peaks, peak memory, tables, JSON."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from unet.device import DeviceSetup, cpu_name, setup_device  # noqa: E402
from unet.model import UNet  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")
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


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_header(title: str, dev: DeviceSetup) -> str:
    """One comment line saying what ran where and when: device, CPU, cores, threads, torch, date."""
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    accel = f"device: {dev.name()} ({dev.type})  " if dev.type != "cpu" else "device: cpu  "
    line = (f"# {title}  {now}  {accel}cpu: {cpu_name()}  cores: {cpu_count()}  "
            f"torch threads: {torch.get_num_threads()}  torch {torch.__version__}  python {platform.python_version()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 * cpu_count():
        # Other work on the cores slows every row unpredictably (tiny inputs with 2+ threads: up to 60x).
        line += (f"\n# WARNING: 1-minute load average {load:.1f} on {cpu_count()} cores: the machine is busy, "
                 f"figures may be unreliable")
    return line


def machine_record(dev: DeviceSetup) -> dict:
    """The machine as a JSON-able dict (for --json outputs)."""
    return {"device_type": dev.type, "device": dev.name(), "cpu": cpu_name(), "cores": cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def device_for(name: str, precision: str) -> DeviceSetup:
    """A DeviceSetup with autocast for ``precision`` (fp32 = autocast off)."""
    return setup_device(name, amp=precision != "fp32", amp_dtype=None if precision == "fp32" else precision)


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


def peak_source(dev: DeviceSetup, precision: str, cpu_peaks: dict[str, float],
                given_tflops: float | None) -> tuple[float | None, str]:
    """The FLOP/s peak MFU is computed against, and where it came from.

    CPU: the dense matmul peak measured in this run for the precision's dtype. Accelerators: ``--peak-tflops``
    or the 16-bit datasheet peak, which is not a fair bar for fp32 (TF32), so fp32 gets none unless given.
    """
    if given_tflops:
        return given_tflops * 1e12, "given"
    if dev.type == "cpu":
        return cpu_peaks.get(precision), f"measured {precision} matmul"
    if precision == "fp32":
        return None, "no fp32 datasheet peak (pass --peak-tflops)"
    peak = dev.peak_flops()
    return (peak, "datasheet 16-bit dense") if peak else (None, "unknown device (pass --peak-tflops)")


def measure_cpu_peaks(precisions: list[str], seconds: float, size: int = 2048, windows: int = 3,
                      detail: dict | None = None) -> dict[str, float]:
    """This CPU's practical peak FLOP/s per precision, measured now: the best burst of two dense kernels.

    Kernels: a ``size``-square matmul (MKL) and a 512-channel 3x3 convolution (oneDNN). Both, because MKL
    on AMD CPUs can reach well under half of what oneDNN's convolutions reach (AMD EPYC here: 0.22 vs 0.51
    TFLOP/s fp32), and a matmul-only peak then gives MFU above 100 %. The best burst, not the mean, because
    on a shared machine a neighbour's work only ever lowers a reading. ``detail`` receives both readings.
    """
    from unet.benchmarking import measure_conv_peak, measure_matmul_peak
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    burst = seconds / (2 * windows)
    peaks = {}
    for p in precisions:
        matmul = max(measure_matmul_peak(torch.device("cpu"), dtypes[p], size=size, seconds=burst)
                     for _ in range(windows))
        conv = max(measure_conv_peak(dtypes[p], burst, size=8 if size < 2048 else 32) for _ in range(windows))
        peaks[p] = max(matmul, conv)
        if detail is not None:
            detail[p] = {"matmul_tflops": matmul / 1e12, "conv3x3_tflops": conv / 1e12}
    return peaks


def apply_cpu_peaks(rows: list[dict], before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Set each CPU row's MFU against the better of the peaks measured before and after the rows.

    On a shared machine one measurement can land in a busy moment; the higher one is closer to what the
    cores can do, so MFU is never flattered by a low peak.
    """
    peaks = {p: max(before.get(p, 0.0), after.get(p, 0.0)) for p in set(before) | set(after)}
    for r in rows:
        peak = peaks.get(r.get("precision"))
        if peak and "achieved_tflops" in r:
            r["peak_tflops"] = peak / 1e12
            r["mfu"] = r["achieved_tflops"] * 1e12 / peak
    return peaks


def print_cpu_peaks(before: dict[str, float], after: dict[str, float]) -> None:
    """Print the measured matmul peaks and which one MFU uses."""
    print("# MFU peak = best dense kernel (matmul or 3x3 conv) measured this run, before / after the rows: "
          + ", ".join(f"{p} {before[p] / 1e12:.3f} / {after.get(p, 0) / 1e12:.3f} TFLOP/s" for p in before))


def reset_peak_memory(dev: DeviceSetup) -> None:
    """Reset the peak-memory counter; on Linux CPUs this resets the process's peak RSS (VmHWM)."""
    if dev.type != "cpu":
        dev.reset_peak_memory()
        return
    import ctypes
    import gc
    gc.collect()
    try:
        # Hand freed heap back to the OS first, or an earlier, bigger row would set this row's RSS floor.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        # '5' resets the resident-set high-water mark, so each row reports its own peak, not the run's.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(dev: DeviceSetup) -> float:
    """Peak device memory since the last reset (CPU: the process's peak RSS, VmHWM)."""
    if dev.type == "cpu":
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
    return dev.peak_memory_bytes() / 2 ** 20


def fmt(value, spec: str = ".1f") -> str:
    """A table cell: numbers formatted, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


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
    """Write ``payload`` to ``path`` (no-op for None)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"# wrote {path}")
