"""Checkpoints off the training loop's critical path: snapshot to host memory, write on a background thread.

The loop only pays for the snapshot: every tensor of the state is copied into a host buffer. On a CUDA device
the buffers are pinned and the copies non-blocking: they are queued on the current stream ahead of the next
step's kernels (so they read the weights as they are now) and the training thread does not wait for them. On
a CPU the snapshot is a memory copy on the training thread. One background thread then waits for those copies, serializes the
snapshot with :func:`unet.checkpoint.save_checkpoint` itself and writes it with its atomic write (temporary
file, fsync, rename), so the bytes on disk and the SIGKILL guarantee are the synchronous save's.

At most one write is in flight: :meth:`BackgroundCheckpointer.save` first waits for the previous write. Why wait
rather than let the newest snapshot replace a queued one: the trainer writes different files (``last.pt`` every
``--save-every`` steps, ``best.pt`` after a better validation), and replacing would silently drop a requested
``best.pt``; and waiting keeps one set of host buffers, reused by every save (a reference-model snapshot with
Adam state is ~0.4 GB). A write (~1 s) is far shorter than the interval between saves (200 steps), so in
practice the wait is zero. An error raised by a write is raised again by the next ``save``, ``flush`` or
``close`` on the training thread: a failed checkpoint is never silent.

Example:
    >>> with BackgroundCheckpointer() as saver:           # doctest: +SKIP
    ...     for step in steps:
    ...         train_step(...)
    ...         if step % save_every == 0:
    ...             saver.save(model_dir / "last.pt", model, step=step, optimizer=optimizer.state_dict())
    ...     saver.flush()                                  # the last checkpoint is on disk from here on
"""
from __future__ import annotations

import copy
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from unet.checkpoint import save_checkpoint
from unet.model import ModelConfig


class _ModelSnapshot:
    """What :func:`save_checkpoint` reads from a model (``config`` and ``state_dict()``), held in host copies.

    Passing this instead of the live model lets the background thread reuse ``save_checkpoint`` unchanged (the
    same dict, the same bytes) while training goes on changing the real weights.
    """

    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor]):
        self.config = config
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class HostSnapshot:
    """Copies of nested state (dicts, lists, tuples of tensors and plain values) in reusable host buffers.

    Buffers are keyed by their place in the tree and reused while shape, dtype and strides match, so periodic
    snapshots of the same state allocate (and, for CUDA, pin) host memory only once. A buffer must not be
    overwritten while a write still reads it: :class:`BackgroundCheckpointer` takes a new snapshot only after
    the previous write finished. A tensor that appears twice in the tree gets two copies (nothing in a
    trainer's checkpoint shares storage).
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self._cuda_device: torch.device | None = None

    def take(self, tree, prefix: str = ""):
        """Host copy of ``tree``; CUDA copies are only queued (see :meth:`record`). Containers are rebuilt."""
        if isinstance(tree, torch.Tensor):
            return self._copy(tree, prefix)
        if isinstance(tree, dict):
            out = copy.copy(tree)  # keeps the mapping's type and attributes (a state_dict's _metadata)
            for k, v in tree.items():
                out[k] = self.take(v, f"{prefix}/{k}")
            return out
        if isinstance(tree, (list, tuple)):
            items = [self.take(v, f"{prefix}/{i}") for i, v in enumerate(tree)]
            if isinstance(tree, list):
                return items
            return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
        return tree  # numbers, strings, None: immutable

    def _copy(self, t: torch.Tensor, key: str) -> torch.Tensor:
        t = t.detach()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.stride() != t.stride():
            # empty_like keeps the strides (channels_last weights stay channels_last, byte for byte on disk).
            buf = torch.empty_like(t, device="cpu", pin_memory=t.is_cuda)
            self._buffers[key] = buf
        buf.copy_(t, non_blocking=t.is_cuda)
        if t.is_cuda:
            self._cuda_device = t.device
        return buf

    def record(self) -> torch.cuda.Event | None:
        """An event after the CUDA copies queued since the last call (None if none), for the writer to wait on.

        Taken on the current stream: the copies were queued there, and the next in-place weight update queued
        there runs after them, so the snapshot is the state at this point of the step.
        """
        device, self._cuda_device = self._cuda_device, None
        if device is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event


def _write(path: Path, snapshot: _ModelSnapshot, extra: dict, copied: torch.cuda.Event | None) -> None:
    """The writer thread's job: wait for the host copies, then the synchronous save, atomic write included."""
    if copied is not None:
        copied.synchronize()
    save_checkpoint(path, snapshot, **extra)


class BackgroundCheckpointer:
    """Write checkpoints on one background thread; the caller only waits for a host snapshot.

    Use it as a context manager (or call :meth:`close`): leaving the block waits for the last write and raises
    its error, if any. Only rank 0 should own one, as only rank 0 writes.
    """

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future | None = None
        self._snapshot = HostSnapshot()
        self._lock = threading.Lock()  # save/flush from one thread at a time (the trainer's)
        self._closed = False

    def save(self, path: str | Path, model: torch.nn.Module, **extra) -> None:
        """Snapshot ``model`` and ``extra`` (as :func:`unet.checkpoint.save_checkpoint` takes them) and write
        them to ``path`` in the background.

        Waits for the previous write first (at most one in flight) and raises its error if it failed.
        ``model`` is the unwrapped UNet (not DDP / torch.compile). On CUDA the copies are queued on the current
        stream, which must be the one that will next update the weights (the default one in the trainer).

        Raises:
            RuntimeError: after :meth:`close`.
            Exception: whatever the previous background write raised (UserError for a missing folder, OSError
                for a full disk, ...).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("BackgroundCheckpointer.save() after close()")
            self._wait_pending()
            state = self._snapshot.take(dict(model.state_dict()), "model")
            snapshot = _ModelSnapshot(model.config, state)
            snapped_extra = self._snapshot.take(extra, "extra")
            copied = self._snapshot.record()
            self._pending = self._executor.submit(_write, Path(path), snapshot, snapped_extra, copied)

    def _wait_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises the write's exception here, on the training thread

    def flush(self) -> None:
        """Wait until the last requested checkpoint is on disk (renamed into place); raise its error if any."""
        with self._lock:
            self._wait_pending()

    def close(self) -> None:
        """Flush, then stop the thread. Safe to call twice."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)

    def __enter__(self) -> "BackgroundCheckpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        # Training is already failing: still land the last good checkpoint, but never hide the first error.
        try:
            self.close()
        except Exception as write_error:  # noqa: BLE001 - reported beside the exception already propagating
            exc.add_note(f"also, the last background checkpoint write failed: {write_error}")
