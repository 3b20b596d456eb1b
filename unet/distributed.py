"""Process-group set-up from torchrun's environment, rank-0 helpers and sum reductions."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (all zeros/ones for a plain ``python`` run)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Read RANK / LOCAL_RANK / WORLD_SIZE as set by torchrun."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    world_size=int(os.environ.get("WORLD_SIZE", 1)))


def _silent(*args, **kwargs) -> None:
    """A print that prints nothing (ranks other than 0)."""


def rank0_printer(dist: DistInfo) -> Callable[..., None]:
    """``print`` on rank 0, a no-op elsewhere: only rank 0 talks."""
    return print if dist.is_main else _silent


def _active() -> bool:
    """Whether this process is in a process group (False for a plain ``python`` run)."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def init_distributed(dist: DistInfo, backend: str, device: torch.device, timeout_s: float = 1800) -> None:
    """Join the process group (env:// rendezvous from torchrun) when more than one process runs."""
    if not dist.distributed or _active():
        return
    timeout = timedelta(seconds=timeout_s)
    kwargs = {}
    if device.type != "cpu":
        kwargs["device_id"] = device  # binds the communicator to this device up front
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt not in (None, "0") and "MASTER_ADDR" in os.environ:  # first attempts use plain env://
        # After an elastic restart torchrun can hand the new group the store of the failed one, and gloo
        # then reads a dead rank's address from it ("connectFullMesh ... Connection refused", seen with
        # torch 2.14). Keys under a per-attempt prefix keep each attempt's rendezvous apart.
        agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), dist.world_size,
                                    is_master=not agent_hosts_store and dist.rank == 0, timeout=timeout,
                                    multi_tenant=True)
        kwargs.update(store=torch_dist.PrefixStore(f"unet/attempt_{attempt}", store), rank=dist.rank,
                      world_size=dist.world_size)
    torch_dist.init_process_group(backend=backend, timeout=timeout, **kwargs)


def cleanup(synchronize: bool = True) -> None:
    """Leave the process group; with ``synchronize`` first wait until every rank has got here."""
    if _active():
        if synchronize:
            # A gloo worker thread drops its last reference to a finished collective's tensors only after
            # the caller has been woken, and that needs the GIL. A rank that went straight on to interpreter
            # shutdown killed such a thread mid-decref: "terminate called without an active exception",
            # SIGABRT (torch 2.14, ~1 in 10 two-rank evaluate.py runs on 2 cores). Waiting here, GIL
            # released, gives the workers that moment.
            torch_dist.barrier()
        torch_dist.destroy_process_group()


@contextmanager
def process_group(dist: DistInfo, backend: str, device: torch.device):
    """Join the process group for the ``with`` body and leave it afterwards.

    A rank that fails skips the final barrier (its peers are stopped by torchrun, not left waiting on it).
    """
    init_distributed(dist, backend, device)
    try:
        yield
    except BaseException:
        cleanup(synchronize=False)
        raise
    cleanup()


def barrier() -> None:
    if _active():
        torch_dist.barrier()


def _all_reduce(t: torch.Tensor, device: torch.device, op) -> torch.Tensor:
    if not _active():
        return t
    home = t.device
    # float64 sums stay exact for pixel counts; hccl has no float64, so NPU reduces in float32.
    buf = t.to(device=device, dtype=torch.float32 if device.type == "npu" else t.dtype)
    torch_dist.all_reduce(buf, op=op)
    return buf.to(device=home, dtype=t.dtype)


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a tensor over all ranks (on the communication device); returns it on its original device."""
    return _all_reduce(t, device, torch_dist.ReduceOp.SUM)


def all_reduce_min(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Element-wise minimum of a tensor over all ranks; returns it on its original device."""
    return _all_reduce(t, device, torch_dist.ReduceOp.MIN)


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank."""
    if not _active():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def same_on_all_ranks(obj) -> bool:
    """Whether every rank holds an equal (picklable) ``obj``; True for a single process."""
    if not _active():
        return True
    gathered = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, obj)
    return all(g == gathered[0] for g in gathered)
