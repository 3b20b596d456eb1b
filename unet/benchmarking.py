"""Measuring helpers for throughput and model-FLOP-utilisation (MFU) figures."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from unet.device import DeviceSetup, cpuinfo, usable_cpus

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as counted by ``torch.utils.flop_counter`` (matmuls and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def model_flops(model: torch.nn.Module, input_shape: tuple[int, ...], backward: bool = True) -> int:
    """FLOPs of a forward (and backward) pass of ``model`` on zeros of ``input_shape``, on the meta device.

    Counting on 'meta' costs no compute and no memory, whatever the model size.
    """
    import copy
    meta_model = copy.deepcopy(model).to("meta")
    x = torch.zeros(input_shape, device="meta")

    def step():
        out = meta_model(x)
        if backward:
            out.float().sum().backward()

    return count_flops(step)


def _matmul_side(device: torch.device, dtype: torch.dtype, size: int, seconds: float,
                 synchronize: Callable[[], None]) -> int:
    """``size``, or a smaller side when one ``size`` matmul would take far longer than ``seconds``.

    A dtype the chip only emulates runs hundreds of times slower (bf16 on an AVX2-only AMD EPYC: 0.26 GFLOP/s,
    so one 2048 matmul took 65 s and a 0.5 s reading 210 s). A 512 matmul's rate says so in a fraction of a
    second; only then (a 2048 matmul projected at over 4x ``seconds``, which a native dtype never comes near)
    is the side cut to what a quarter of ``seconds`` allows, so native readings keep their size.
    """
    probe = min(size, 512)
    a = torch.randn(probe, probe, device=device, dtype=dtype)
    a @ a  # first call: kernel selection, not throughput
    synchronize()
    t0 = time.perf_counter()
    a @ a
    synchronize()
    rate = 2 * probe ** 3 / max(time.perf_counter() - t0, 1e-9)
    if 2 * size ** 3 / rate <= 4 * seconds:
        return size
    return max(probe, int((rate * seconds / 8) ** (1 / 3)))


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                        seconds: float = 1.0, synchronize: Callable[[], None] = lambda: None) -> float:
    """Dense matmul FLOP/s reached on ``device`` (the practical peak MFU is measured against on a CPU), on a side
    of ``size`` or less where one such matmul would not fit in ``seconds`` (:func:`_matmul_side`)."""
    size = _matmul_side(device, dtype, size, seconds, synchronize)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
        if n % 4 == 0:
            synchronize()
    synchronize()
    return 2 * size ** 3 * n / (time.perf_counter() - t0)


def measure_conv_peak(dtype: torch.dtype = torch.float32, seconds: float = 1.0, channels: int = 512,
                      size: int = 32) -> float:
    """FLOP/s of a dense 3x3 convolution on the CPU (oneDNN, channels_last), ``channels`` in and out, batch 8."""
    x = torch.randn(8, channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    flop = 2 * 8 * channels * channels * 9 * size * size
    torch.nn.functional.conv2d(x, w, padding=1)  # primitive creation is not throughput
    n, t0 = 0, time.perf_counter()
    while n < 1 or time.perf_counter() - t0 < seconds:
        torch.nn.functional.conv2d(x, w, padding=1)
        n += 1
    return flop * n / (time.perf_counter() - t0)


def measure_cpu_kernels(dtype: torch.dtype = torch.float32, seconds: float = 1.0, size: int = 2048,
                        windows: int = 1) -> dict[str, float]:
    """FLOP/s of this CPU's two dense kernels, ``matmul`` (MKL) and ``conv3x3`` (oneDNN), in ``seconds`` in all.

    Each is the best of ``windows`` short bursts, not their mean: on a shared machine a neighbour's work only
    ever lowers a reading. ``size`` is the matmul's side; below 2048 (quick runs) the convolution's maps
    shrink from 32x32 to 8x8 as well.
    """
    cpu, burst = torch.device("cpu"), seconds / (2 * windows)
    conv_size = 32 if size >= 2048 else 8
    return {"matmul": max(measure_matmul_peak(cpu, dtype, size=size, seconds=burst) for _ in range(windows)),
            "conv3x3": max(measure_conv_peak(dtype, burst, size=conv_size) for _ in range(windows))}


def measure_cpu_peak(dtype: torch.dtype = torch.float32, seconds: float = 1.0, size: int = 2048,
                     windows: int = 1) -> float:
    """This CPU's practical dense peak: the better of a matmul (MKL) and a 3x3 convolution (oneDNN).

    Both, because MKL's matmul reaches well under half of oneDNN's convolution speed on some AMD CPUs
    (AMD EPYC here, fp32: 0.22-0.33 vs 0.52 TFLOP/s), and a matmul-only peak would put MFU above 100 %.
    Arguments as for :func:`measure_cpu_kernels`.
    """
    return max(measure_cpu_kernels(dtype, seconds, size, windows).values())


def peak_source(dev: DeviceSetup, precision: str, cpu_peaks: dict[str, float],
                given_tflops: float | None) -> tuple[float | None, str]:
    """The FLOP/s peak MFU is computed against, and where it came from.

    ``given_tflops`` (``--peak-tflops``) wins. CPU: ``cpu_peaks[precision]``, measured by the caller with
    :func:`measure_cpu_peak`. Accelerators: the 16-bit datasheet peak, none for fp32 (see ``peak_flops``).
    """
    if given_tflops:
        return given_tflops * 1e12, "given"
    if dev.type == "cpu":
        peak = cpu_peaks.get(precision)
        return (peak, f"measured {precision} matmul/conv3x3 max") if peak else (None, "not measured")
    peak = dev.peak_flops(precision)
    if peak:
        return peak, "datasheet 16-bit dense"
    if precision == "fp32":
        return None, "no fp32 datasheet peak (pass --peak-tflops)"
    return None, "unknown device (pass --peak-tflops)"


def time_steps(step: Callable[[], object], warmup: int, steps: int, dev: DeviceSetup,
               barrier: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Run ``warmup`` untimed calls of ``step``, then time ``steps`` calls between two device synchronisations.

    The peak-memory counter is reset after the warm-up, so ``dev.peak_memory_bytes()`` afterwards is the
    timed steps' own peak. ``barrier`` lines distributed ranks up before and after the timed steps.

    Returns:
        (seconds of the warm-up, seconds per timed step).
    """
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    dev.synchronize()
    warmup_s = time.perf_counter() - t0
    dev.reset_peak_memory()
    barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dev.synchronize()
    barrier()
    return warmup_s, (time.perf_counter() - t0) / steps


def cpu_theoretical_peak(cores: int | None = None, info: dict[str, str] | None = None) -> dict:
    """This CPU's datasheet-style dense peak: cores x GHz x FLOP per cycle of its widest ISA, fp32 and bf16.

    FLOP/cycle per core assume two FMA pipes of the widest vector unit (Intel Xeon Gold/Platinum, AMD Zen 5):
    fp32 = 2 pipes x lanes x 2 (multiply + add); AMD family 0x19 (Zen 3/4) executes AVX-512 on 256-bit pipes,
    so it counts 256. bf16: AMX (TDPBF16PS, 16x16x32 multiply-adds every 16 cycles) 1024 FLOP/cycle; AVX512_BF16
    (VDPBF16PS, two bf16 products per fp32 lane) twice fp32; otherwise bf16 runs at the fp32 rate. The clock
    is /proc/cpuinfo's ``cpu MHz`` (the nominal clock inside a VM; turbo is not counted). A ceiling to read the
    measured kernels against, never a measurement.

    Args:
        cores: cores this process may use (default: its affinity mask).
        info: /proc/cpuinfo fields of one processor (tests inject these).

    Returns:
        ``{"fp32": FLOP/s, "bf16": FLOP/s, "ghz", "cores", "isa", "description"}``; FLOP/s None where the
        clock is unknown.
    """
    info = cpuinfo() if info is None else info
    cores = cores or usable_cpus()
    flags = set(info.get("flags", "").split())
    width = 512 if "avx512f" in flags else 256 if "avx2" in flags and "fma" in flags else 128
    isa = {512: "AVX-512", 256: "AVX2+FMA", 128: "SSE"}[width]
    if info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25":
        width = min(width, 256)
        isa += " (256-bit pipes)"
    fp32_per_cycle = 2 * (width // 32) * 2
    if "amx_bf16" in flags:
        bf16_per_cycle, bf16_isa = 1024, "AMX-BF16"
    elif "avx512_bf16" in flags:
        bf16_per_cycle, bf16_isa = 2 * fp32_per_cycle, "AVX512_BF16"
    else:
        bf16_per_cycle, bf16_isa = fp32_per_cycle, "fp32 units"
    try:
        ghz = float(info["cpu MHz"]) / 1e3
    except (KeyError, ValueError):
        ghz = None
    peak = {"fp32": cores * ghz * 1e9 * fp32_per_cycle if ghz else None,
            "bf16": cores * ghz * 1e9 * bf16_per_cycle if ghz else None}
    if ghz:
        description = (f"CPU theoretical peak: {cores} cores x {ghz:.2f} GHz x {fp32_per_cycle} FLOP/cycle "
                       f"({isa}, 2 FMA pipes) = {peak['fp32'] / 1e12:.3f} TFLOP/s fp32; x {bf16_per_cycle} "
                       f"FLOP/cycle ({bf16_isa}) = {peak['bf16'] / 1e12:.3f} TFLOP/s bf16")
    else:
        description = "CPU theoretical peak: unknown (no clock in /proc/cpuinfo)"
    return {**peak, "ghz": ghz, "cores": cores, "isa": f"{isa}; bf16 {bf16_isa}",
            "fp32_flop_per_cycle": fp32_per_cycle, "bf16_flop_per_cycle": bf16_per_cycle, "description": description}
