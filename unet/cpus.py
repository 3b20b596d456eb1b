"""The CPUs this process may use: one definition for the device layer (threads, loader workers) and the I/O layer
(codec thread pools), which must not import the device layer."""
from __future__ import annotations

import os

__all__ = ["usable_cpus"]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
