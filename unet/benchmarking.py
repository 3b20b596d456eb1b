"""Measuring helpers for throughput and model-FLOP-utilisation (MFU) figures."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


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


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                        seconds: float = 1.0, synchronize: Callable[[], None] = lambda: None) -> float:
    """Dense matmul FLOP/s reached on ``device`` (the practical peak MFU is measured against on a CPU)."""
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


def measure_cpu_peak(dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> float:
    """This CPU's practical dense peak: the better of a matmul (MKL) and a 3x3 convolution (oneDNN).

    Both, because MKL's matmul reaches well under half of oneDNN's convolution speed on some AMD CPUs
    (AMD EPYC here, fp32: 0.22-0.33 vs 0.52 TFLOP/s), and a matmul-only peak would put MFU above 100 %.
    """
    cpu = torch.device("cpu")
    return max(measure_matmul_peak(cpu, dtype, seconds=seconds / 2), measure_conv_peak(dtype, seconds / 2))
