"""Freed host memory kept for reuse (``train.py --host-allocator``): glibc's heap instead of one mmap per tensor.

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns
it to the kernel on ``free``. A UNet training step on the CPU allocates and frees its large activations and
gradients every step (the reference model at batch 2: tensors of 84 MB), so each step page-faults gigabytes in
again and the kernel zeroes them. On a 2-core Xeon, ``train.py --benchmark`` (fp32, reference model, batch 2)
spent 11-28 s of 63-77 s in the kernel with 6.6-6.7 M page faults, against 2-5 s and 1.3 M with mmap off
(0.207, 0.223 and 0.250 img/s against 0.258 and 0.272: +9-25 %; docs/benchmarks.md). With mmap off and
trimming above 2 GiB only, freed blocks stay in the heap and the next step reuses them; the cost is that the
process keeps its peak footprint (there 3.6-3.7 GB of RSS instead of 3.2).

torch's own CPU allocator has no cache, and a preloaded jemalloc or tcmalloc (Intel's advice for CPU training)
is no pip dependency; ``mallopt`` is glibc's documented way to do this from inside the process.
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["HOST_ALLOCATORS", "keep_freed_memory"]

HOST_ALLOCATORS = ("auto", "system")

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_TRIM_ABOVE = 2 ** 31 - 1  # mallopt takes an int: give back the heap's free top only above 2 GiB
_TOP_PAD = 256 * 2 ** 20  # grow the heap in steps of 256 MiB, not page by page


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed memory in the heap for the process's later allocations.

    Call it before the large allocations (the model, the first step). Memory already mapped is not moved.

    Returns:
        A line for the user: what was set, or why nothing was (not Linux, not glibc, mallopt refused).
    """
    if not sys.platform.startswith("linux"):
        return f"host allocator: the system's ({sys.platform}; the glibc setting is for Linux)"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it (musl's mallopt ignores these parameters)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "host allocator: the system's (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the trim threshold first, since setting it also stops glibc from raising the
    # mmap threshold on its own.
    if not all(mallopt(param, value) == 1 for param, value in
               ((_M_TRIM_THRESHOLD, _TRIM_ABOVE), (_M_TOP_PAD, _TOP_PAD), (_M_MMAP_MAX, 0))):
        return "host allocator: the system's (glibc's mallopt refused the setting)"
    return "host allocator: glibc heap, freed memory kept for reuse (no mmap per large tensor)"
