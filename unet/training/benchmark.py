"""``train.py --benchmark``: time training steps of a built model, no checkpoints, no validation."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from unet.atomic import make_folder
from unet.benchmarking import PRECISION_DTYPES, measure_cpu_peak, model_flops, peak_source, time_steps
from unet.device import DeviceSetup
from unet.distributed import DistInfo, barrier
from unet.run_log import write_json
from unet.training.config import RunConfig
from unet.training.narration import benchmark_line


def run_benchmark(config: RunConfig, model: torch.nn.Module, dev: DeviceSetup, dist: DistInfo,
                  step: Callable[[], torch.Tensor], first_step: Callable[[float], float | None],
                  say: Callable[[str], None]) -> dict:
    """Time ``max_steps`` training steps after ``warmup_steps``, device synchronised; writes benchmark.json.

    The first step is timed on its own (``first_step_s``: torch.compile's compilation when compiling) and
    counts as the first warm-up step.

    Args:
        config: the run's settings (batch, crop size, steps, peak FLOP/s, model folder).
        model: the built model (unwrapped).
        dev, dist: the device and this process's place in the job.
        step: one optimizer step on the next batch.
        first_step: given the time before the first step, reports and returns its duration.
        say: rank 0's printer.

    Returns:
        The result dict (also in ``model_dir/benchmark.json``).
    """
    c = config
    flops_per_image = model_flops(model, (1, model.config.in_channels, c.input_size, c.input_size))
    model.train()
    started = time.perf_counter()
    step()
    first_step_s = first_step(started)
    _, step_time = time_steps(step, max(c.warmup_steps - 1, 0), c.max_steps, dev, barrier=barrier)
    peak_memory = dev.peak_memory_bytes()  # read before the CPU peak measurement adds its own buffers
    achieved = flops_per_image * c.batch_size / step_time  # per device
    precision = dev.amp_name
    cpu_peaks = ({precision: measure_cpu_peak(PRECISION_DTYPES[precision])}
                 if dev.type == "cpu" and not c.peak_tflops else {})
    peak, source = peak_source(dev, precision, cpu_peaks, c.peak_tflops)
    global_batch = c.batch_size * dist.world_size
    result = {"images_per_s": global_batch / step_time, "step_time_ms": step_time * 1e3,
              "global_batch": global_batch, "world_size": dist.world_size,
              "batch_per_device": c.batch_size, "input_size": c.input_size, "amp": dev.amp_name,
              "compile": c.compile, "compile_mode": c.compile_mode if c.compile else None,
              "first_step_s": first_step_s, "loss": c.loss, "device": dev.name(), "peak_memory_mb": peak_memory / 2 ** 20,
              "gflop_per_image": flops_per_image / 1e9, "achieved_tflops_per_device": achieved / 1e12,
              "peak_tflops": peak / 1e12 if peak else None, "peak_source": source,
              "mfu": achieved / peak if peak else None, "steps": c.max_steps, "warmup_steps": c.warmup_steps}
    say(benchmark_line(result))
    if dist.is_main:
        make_folder(Path(c.model_dir), "--model-dir")
        write_json(Path(c.model_dir) / "benchmark.json", result)
    return result
