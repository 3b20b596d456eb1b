"""Block inputs read ahead of the device loop and results written behind it, each in a thread of its own: the stack
pipeline's reader and writer stages (:mod:`unet.prediction.pipeline`) for block-wise prediction.

::

    reader thread   block -> its read box from the volume (chunks decompressed), [0, 1] float, pinned  --READ_AHEAD-->
    main thread     host -> device (non_blocking) -> tiles -> model -> stitched block -> pinned host copy + event
                                                                                                --WRITE_BEHIND-->
    writer thread   waits for the event, then ``finish``: masks/probabilities compressed into chunks, the record

Why ``--block-io auto`` uses it only off the CPU: on an accelerator the forwards leave the host's cores idle, so
decompressing the next read box and compressing the last block's chunks can run beside them; on a CPU the
forwards take every core and the extra threads preempt torch's OpenMP threads (on 2 Intel Xeon cores a threaded
loop took 257 s where the inline loop took 166 s, docs/inference.md).

What a kill loses is unchanged in kind: a block is recorded complete by the writer thread only after its chunks
are written, so a resume redoes the block being written, at most ``WRITE_BEHIND`` queued behind it and the block
on the device; blocks read ahead were never recorded. Results are the inline loop's, bit for bit: the same
forwards, and ``finish`` computes the same masks from the same float32 probabilities on the host.
"""
from __future__ import annotations

import queue
from typing import Callable, Iterable, Iterator

import torch

from unet.prediction.blocks import Block
from unet.prediction.pipeline import END, Pipe, copy_to_host

__all__ = ["BlockIO", "BLOCK_IO", "READ_AHEAD", "WRITE_BEHIND", "threaded_block_io"]

BLOCK_IO = ("auto", "threads", "inline")
READ_AHEAD = 2  # read boxes waiting for the device (host memory: this many read boxes, pinned)
WRITE_BEHIND = 1  # predicted blocks waiting for the writer: each one more is one more block a kill can lose


def threaded_block_io(mode: str, device_type: str) -> bool:
    """Whether block-wise prediction reads and writes in threads: ``threads``, ``inline``, or ``auto`` (threads
    off the CPU only, see the module docstring)."""
    if mode not in BLOCK_IO:
        raise ValueError(f"block I/O {mode!r}: expected one of {', '.join(BLOCK_IO)}")
    return mode == "threads" or (mode == "auto" and device_type != "cpu")


class BlockIO:
    """The reader and writer threads around :func:`unet.prediction.blocks.predict_blocks`; a context manager.

    Use ``blocks()`` as its blocks, ``take`` in its ``read`` (the host tensor; the caller moves it to the device)
    and ``finish`` as its ``finish``. On leaving, the writer is drained (every finished block written and recorded);
    the first error of either thread or of the caller's loop is raised in the caller, unchanged (a UserError keeps
    its one line).

    Args:
        blocks: the blocks to predict, in order (consumed by the reader thread).
        read_host: a block -> its read box as a CPU float tensor (runs in the reader thread).
        finish: a block and its ``(K, bh, bw)`` float32 probabilities on the host -> written and recorded (runs
            in the writer thread, in block order).
        dev: the device setup (pinned host memory and copy events off the CPU).
    """

    def __init__(self, blocks: Iterable[Block], read_host: Callable[[Block], torch.Tensor],
                 finish: Callable[[Block, torch.Tensor], None], dev):
        self.pipe = Pipe()
        self._dev = dev
        self._inbox: queue.Queue = queue.Queue(READ_AHEAD)
        self._outbox: queue.Queue = queue.Queue(WRITE_BEHIND)
        self._inputs: dict[int, torch.Tensor] = {}
        self._threads = [self.pipe.run(_read_ahead, self.pipe, self._inbox, blocks, read_host, dev.pin_memory),
                         self.pipe.run(_write_behind, self.pipe, self._outbox, finish)]

    def blocks(self) -> Iterator[Block]:
        """The blocks in order, each once its read box is on the host."""
        while (item := self.pipe.get(self._inbox)) is not END:
            block, host = item
            self._inputs[block.index] = host
            yield block

    def take(self, block: Block) -> torch.Tensor:
        """The read box of a block that :meth:`blocks` yielded (host memory, pinned off the CPU)."""
        return self._inputs.pop(block.index)

    def finish(self, block: Block, probs: torch.Tensor) -> None:
        """Queue a predicted block for the writer: copied to pinned host memory without waiting for the copy."""
        (probs,), event = copy_to_host([probs], self._dev)
        self.pipe.put(self._outbox, (block, probs, event))

    def __enter__(self) -> "BlockIO":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.pipe.close(self._threads, self._outbox, exc)  # the writer drained, or every stage stopped
        return False


def _read_ahead(pipe: Pipe, inbox: queue.Queue, blocks: Iterable[Block], read_host: Callable[[Block], torch.Tensor],
                pin: bool) -> None:
    """Reader thread: each block's read box, pinned off the CPU so that the copy to the device is asynchronous."""
    for block in blocks:
        host = read_host(block)
        pipe.put(inbox, (block, host.pin_memory() if pin else host))
    pipe.put(inbox, END)


def _write_behind(pipe: Pipe, outbox: queue.Queue, finish: Callable[[Block, torch.Tensor], None]) -> None:
    """Writer thread: wait for each block's copy to the host, then write and record it."""
    with torch.inference_mode():  # grad mode is per thread; the main loop's does not reach here
        while (item := pipe.get(outbox)) is not END:
            block, probs, event = item
            if event is not None:
                event.synchronize()
            finish(block, probs)
