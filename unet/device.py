"""The one place that knows about device kinds: Ascend NPU (torch_npu), CUDA and CPU.

Everything device-specific — choosing the device, the mixed-precision dtype, the gradient scaler,
the memory layout and backend speed flags, peak-memory readings — lives here, so the rest of the
package runs unchanged on any of them.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import resource
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from unet.cpus import usable_cpus  # noqa: F401 - part of the device layer's interface
from unet.errors import UserError
from unet.options import option

DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DeviceOptions:
    """Which device and precision a command runs on (the same flags in every command)."""

    device: str = option("auto", "auto = Ascend NPU if torch_npu is loaded and one is present, else CUDA, else CPU",
                         name="device", choices=DEVICE_CHOICES, group="device")
    amp: bool = option(False, "mixed precision with torch.autocast on the device", name="amp", switch="on",
                       group="device")
    amp_dtype: str | None = option(None, "autocast dtype (default: bf16 where the device supports it, else fp16 "
                                         "with loss scaling)", flags=("--amp-dtype", "--amp_dtype"),
                                   choices=sorted(AMP_DTYPES), group="device")

PRECISIONS = ("auto", "fp32", *AMP_DTYPES)  # auto: bf16 where native, else fp32
# /proc/cpuinfo flags of CPUs that compute bf16 natively: AVX-512 BF16 dot products or AMX tiles (x86), bf16
# (Arm "Features"). Elsewhere torch emulates bf16 on the CPU, which is slower than fp32.
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class PrecisionOptions:
    """The arithmetic of prediction (infer.py, evaluate.py); training chooses with --amp alone."""

    precision: str = option("auto", "auto: bf16 autocast where the device computes bf16 natively (CPUs with "
                                    "AVX512_BF16 or AMX, CUDA sm80+, Ascend 910B), else fp32; on ISBI fold 0 bf16 "
                                    "changed 0.03 % of mask pixels (docs/benchmarks.md); fp32 opts out",
                            flags="--precision", choices=PRECISIONS, group="device")


# Dense bf16/fp16 matrix peaks (FLOP/s, NVIDIA's datasheets: the sparse figures halved) by device-name fragment
# (spaces removed), for model-FLOP-utilisation figures. The first fragment found in the name wins, so the
# specific H100 forms come before the plain "H100" (SXM, e.g. "NVIDIA H100 80GB HBM3").
# Only used when the user does not give --peak-tflops; unknown devices report MFU as unknown.
KNOWN_PEAK_FLOPS = {
    "H200": 989e12,
    "H100PCIe": 756e12,
    "H100NVL": 835e12,
    "H100": 989e12,
    "A100": 312e12,
    "V100": 125e12,
    "L40S": 362e12,
    "Ascend910B": 313e12,
    "Ascend910": 256e12,
}


def _npu_available() -> bool:
    # torch_npu registers torch.npu when torch auto-loads it (torch >= 2.5); we never import it ourselves.
    mod = getattr(torch, "npu", None)
    return bool(mod is not None and mod.is_available())


# The CUDA probe is looked up at call time, so a test that patches torch.cuda.is_available still reaches it.
DEFAULT_PROBES: dict[str, Callable[[], bool]] = {"npu": _npu_available, "cuda": lambda: torch.cuda.is_available(),
                                                 "cpu": lambda: True}


def device_module(device_type: str):
    """torch.cuda / torch.npu / torch.cpu for a device type."""
    return torch.get_device_module(device_type)


def resolve_device_type(name: str = "auto", probes: dict[str, Callable[[], bool]] | None = None) -> str:
    """Device type for ``--device``: auto = NPU if available, else CUDA, else CPU.

    Args:
        name: one of ``auto``, ``npu``, ``cuda``, ``cpu``.
        probes: availability checks by device type (tests inject these); defaults to torch's own.

    Raises:
        UserError: for an unknown name, or an explicit device that is not available, with what to do.
    """
    probes = {**DEFAULT_PROBES, **(probes or {})}
    if name not in DEVICE_CHOICES:
        raise UserError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {name!r}")
    if name == "auto":
        return next(t for t in ("npu", "cuda", "cpu") if probes[t]())
    if not probes[name]():
        hint = {"npu": "install torch_npu with the CANN toolkit (pip install -e .[npu])",
                "cuda": "install a CUDA build of torch and check nvidia-smi"}.get(name, "")
        raise UserError(f"--device {name} was asked for but no {name.upper()} is available: {hint}, "
                        f"or use --device auto")
    return name


def dist_backend(device_type: str) -> str:
    """Collective backend for a device type: hccl (NPU), nccl (CUDA), gloo (CPU)."""
    getter = getattr(torch.distributed, "get_default_backend_for_device", None)
    if getter is not None:
        try:
            return getter(device_type)
        except (RuntimeError, ValueError):
            pass  # torch without that backend registered: use the fixed map below
    return {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}[device_type]


def bf16_supported(device_type: str) -> bool:
    """Whether the device runs bf16 autocast natively (CPU; CUDA sm80+; Ascend 910B and later)."""
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return torch.cuda.get_device_capability()[0] >= 8
    if device_type == "npu":
        check = getattr(device_module("npu"), "is_bf16_supported", None)
        return bool(check and check())
    return False


def native_bf16(device_type: str, info: dict[str, str] | None = None) -> bool:
    """Whether the device computes bf16 natively (on a CPU: its flags; elsewhere :func:`bf16_supported`).

    Args:
        device_type: ``cpu``, ``cuda`` or ``npu``.
        info: /proc/cpuinfo fields (tests inject these; default: this machine's).
    """
    if device_type != "cpu":
        return bf16_supported(device_type)
    info = cpuinfo() if info is None else info
    return bool(NATIVE_BF16_CPU_FLAGS & set((info.get("flags") or info.get("Features") or "").split()))


def prediction_autocast(precision: str, device: DeviceOptions, device_type: str,
                        info: dict[str, str] | None = None) -> tuple[bool, str | None]:
    """``(amp, amp_dtype)`` for :func:`setup_device` from ``--precision`` and the device flags.

    ``--amp`` (with ``--amp-dtype``) keeps its meaning from training; ``--precision auto`` is bf16 autocast where
    :func:`native_bf16` says the resolved ``device_type`` computes it natively, else fp32.

    Raises:
        UserError: ``--amp`` together with a ``--precision`` other than auto.
    """
    if device.amp:
        if precision != "auto":
            raise UserError(f"--amp and --precision {precision} both choose the arithmetic; pass one of them")
        return True, device.amp_dtype
    if precision == "auto":
        return (True, "bf16") if native_bf16(device_type, info) else (False, None)
    return (False, None) if precision == "fp32" else (True, precision)


def prediction_device(device: DeviceOptions, precision: str, local_rank: int = 0) -> "DeviceSetup":
    """The device setup of infer.py and evaluate.py: the device resolved once, the precision chosen for it."""
    device_type = resolve_device_type(device.device)
    amp, amp_dtype = prediction_autocast(precision, device, device_type)
    return setup_device(device_type, amp=amp, amp_dtype=amp_dtype, local_rank=local_rank)


@dataclass
class DeviceSetup:
    """A chosen device and how to run on it.

    Attributes:
        device: the torch device (``npu:i`` / ``cuda:i`` use the process's local rank).
        amp: whether autocast is on.
        amp_dtype: autocast dtype when ``amp`` (bf16 or fp16).
        memory_format: channels_last on CUDA/CPU, contiguous (NCHW) on NPU where that is the fast layout.
    """

    device: torch.device
    amp: bool = False
    amp_dtype: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format

    @property
    def type(self) -> str:
        return self.device.type

    @property
    def backend(self) -> str:
        return dist_backend(self.type)

    @property
    def pin_memory(self) -> bool:
        return self.type != "cpu"

    @property
    def amp_name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32") if self.amp else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for this device (a no-op context when AMP is off)."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.type, dtype=self.amp_dtype)

    def grad_scaler(self):
        """A gradient scaler: active only for fp16, where small gradients would underflow."""
        enabled = self.amp and self.amp_dtype == torch.float16
        if enabled and self.type == "npu":
            # torch_npu ships its own scaler; the generic one is not validated on NPU here. Imported here
            # only: torch_npu is an optional extra that cannot even be imported on machines without CANN.
            import torch_npu  # noqa: F401  (only reachable when torch_npu is loaded)
            return torch_npu.npu.amp.GradScaler()
        return torch.amp.GradScaler(self.type, enabled=enabled)

    @property
    def compile_by_default(self) -> bool:
        """Whether ``--compile`` is on when not given: on CUDA only.

        CUDA: the compiled whole step measured 1.6x eager on an H200 (docs/benchmarks.md). CPU: compile measured
        slower than eager on 2 cores (same page). NPU: not measured on an NPU, so eager stays its default.
        """
        return self.type == "cuda"

    def optimizer_kwargs(self) -> dict:
        """Adam's implementation switch: ``fused=True`` on CUDA and CPU (one kernel per step for all parameters).

        On the CPU torch's default is a per-tensor loop: 129 ms per step for the reference model's 34.5 M
        parameters on 2 cores against 22 ms fused (5 % of a bf16 training step there); the update is the same
        formula, rounded differently. NPU: torch_npu's fused optimizers are not used; no NPU here to check
        which form its documentation supports for this torch version.
        """
        return {"fused": True} if self.type in ("cuda", "cpu") else {}

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move a model to the device in its fast memory layout."""
        return model.to(self.device, memory_format=self.memory_format)

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """Move an NCHW batch to the device in the model's layout (non-blocking from pinned memory)."""
        batch = batch.to(self.device, non_blocking=True)
        return batch.contiguous(memory_format=self.memory_format) if batch.dim() == 4 else batch

    def rng_state(self) -> dict:
        """torch's CPU generator state and, off CPU, this device's, for a checkpoint."""
        state = {"torch": torch.get_rng_state()}
        if self.type != "cpu":
            state["device"] = device_module(self.type).get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict) -> None:
        """Restore what :meth:`rng_state` returned (a CPU-only state leaves the device generator alone)."""
        torch.set_rng_state(state["torch"])
        if self.type != "cpu" and "device" in state:
            device_module(self.type).set_rng_state(state["device"], self.device)

    def ddp_kwargs(self) -> dict:
        """Keyword arguments of ``DistributedDataParallel`` for a model on this device."""
        return {"device_ids": None if self.type == "cpu" else [self.device]}

    def synchronize(self) -> None:
        if self.type != "cpu":
            device_module(self.type).synchronize(self.device)

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory reading; on Linux CPUs this resets the process's peak RSS (VmHWM)."""
        if self.type != "cpu":
            device_module(self.type).reset_peak_memory_stats(self.device)
            return
        gc.collect()
        try:
            # Hand freed heap back to the OS first, or an earlier, bigger workload would set the new RSS floor.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc
        try:
            # '5' resets the resident-set high-water mark, so the next reading is this workload's own peak.
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # no /proc: peak_memory_bytes falls back to the process's lifetime peak

    def peak_memory_bytes(self) -> int:
        """Peak device memory allocated since the last reset (CPU: peak RSS, VmHWM; else lifetime ru_maxrss)."""
        if self.type != "cpu":
            return int(device_module(self.type).max_memory_allocated(self.device))
        hwm = _proc_kib("/proc/self/status", "VmHWM:")
        if hwm is not None:
            return hwm
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    def free_memory_bytes(self) -> int:
        """Memory free for new tensors now: the accelerator's ``mem_get_info`` free bytes, or on CPU the
        kernel's MemAvailable (free RAM plus reclaimable cache; ``os.sysconf`` free pages where /proc is absent)."""
        if self.type != "cpu":
            free, _ = device_module(self.type).mem_get_info(self.device)
            return int(free)
        available = _proc_kib("/proc/meminfo", "MemAvailable:")
        if available is not None:
            return available
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))

    def name(self) -> str:
        """Human-readable device name, e.g. 'NVIDIA H100 80GB HBM3' or the CPU model."""
        if self.type == "cpu":
            return cpu_name()
        return str(device_module(self.type).get_device_name(self.device))

    def peak_flops(self, dtype_name: str | None = None) -> float | None:
        """Known dense 16-bit matrix peak in FLOP/s of this accelerator, or None.

        None for fp32 (``dtype_name``, default this setup's autocast dtype): the datasheet figures are 16-bit
        ones, no fair bar for fp32/TF32. None on CPU and for devices not in ``KNOWN_PEAK_FLOPS``.
        """
        if self.type == "cpu" or (dtype_name or self.amp_name) == "fp32":
            return None
        name = self.name().replace(" ", "")
        return next((flops for fragment, flops in KNOWN_PEAK_FLOPS.items() if fragment in name), None)


class Prefetcher:
    """Batches moved to the device one step ahead, on a side stream (CUDA); a plain pass-through elsewhere.

    Wraps an iterator of tuples of host tensors (pinned by the loader on accelerators) and yields the same
    tuples moved by :meth:`DeviceSetup.to_device`. On CUDA the copies of batch ``i + 1`` are queued on a side
    stream while the compute stream works on batch ``i``; the compute stream waits for them before using a
    batch, and ``record_stream`` keeps the caching allocator from reusing its memory too early (the pattern of
    NVIDIA's apex ``data_prefetcher``). On CPU and NPU (not measured there) every batch is moved when asked.

    Args:
        batches: an iterator of tuples of tensors.
        dev: the device setup.
    """

    def __init__(self, batches, dev: DeviceSetup):
        self.batches, self.dev = batches, dev
        self.stream = torch.cuda.Stream(dev.device) if dev.type == "cuda" else None
        self.ahead: tuple[torch.Tensor, ...] | None = None

    def __iter__(self) -> "Prefetcher":
        return self

    def _move(self, batch) -> tuple[torch.Tensor, ...]:
        return tuple(self.dev.to_device(t) for t in batch)

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self.stream is None:
            return self._move(next(self.batches))
        if self.ahead is None:
            self._load()  # the first batch (or the end of the stream)
        if self.ahead is None:
            raise StopIteration
        batch, compute = self.ahead, torch.cuda.current_stream(self.dev.device)
        compute.wait_stream(self.stream)
        for t in batch:
            t.record_stream(compute)
        self._load()
        return batch

    def _load(self) -> None:
        try:
            host = next(self.batches)
        except StopIteration:
            self.ahead = None
            return
        with torch.cuda.stream(self.stream):
            self.ahead = self._move(host)


def _proc_kib(path: str, key: str) -> int | None:
    """The ``key`` line's kB figure of a /proc file, in bytes; None where the file or the line is absent."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's processor string)."""
    return cpuinfo().get("model name") or platform.processor() or "unknown CPU"


def setup_device(name: str = "auto", *, amp: bool = False, amp_dtype: str | None = None, local_rank: int = 0,
                 probes: dict[str, Callable[[], bool]] | None = None) -> DeviceSetup:
    """Choose the device and apply its speed settings.

    Args:
        name: ``--device`` value.
        amp: turn on autocast.
        amp_dtype: ``bf16`` or ``fp16``; None = bf16 where supported natively, else fp16.
        local_rank: index of the device this process drives (torchrun's LOCAL_RANK).
        probes: injected availability checks (tests).

    Returns:
        A :class:`DeviceSetup`.

    Raises:
        UserError: for a bad ``--device`` or ``--amp-dtype`` value, or an unavailable device.
    """
    device_type = resolve_device_type(name, probes)
    if amp_dtype is not None and amp_dtype not in AMP_DTYPES:
        raise UserError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {amp_dtype!r}")
    device = torch.device(device_type) if device_type == "cpu" else torch.device(device_type, local_rank)
    if device_type != "cpu":
        device_module(device_type).set_device(device)
    dtype = None
    if amp:
        dtype = AMP_DTYPES[amp_dtype] if amp_dtype else (
            torch.bfloat16 if bf16_supported(device_type) else torch.float16)
    apply_speed_settings(device_type)
    memory_format = torch.contiguous_format if device_type == "npu" else torch.channels_last
    return DeviceSetup(device=device, amp=amp, amp_dtype=dtype, memory_format=memory_format)


def apply_speed_settings(device_type: str) -> None:
    """Backend flags that make convolutions fast on each device."""
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = True
        # 0 = try every algorithm cuDNN offers (torch's default stops at 10): a one-time search per shape, and
        # a training run uses one shape. Whether it pays is for the GPU check to measure.
        torch.backends.cudnn.benchmark_limit = 0
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device_type == "npu":
        # Binary (pre-compiled) operators: online JIT compilation is slow for the dynamic tile shapes here.
        device_module("npu").set_compile_mode(jit_compile=False)
