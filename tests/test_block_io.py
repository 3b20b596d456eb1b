"""Block-wise reading and writing in threads (unet.prediction.block_io): when they are used, and that the first
error of any stage reaches the caller unchanged with the threads stopped. Equality with the inline loop and
kill-and-resume are tested through infer.py in test_infer_blocks.py (--block-io threads)."""
import threading
from types import SimpleNamespace

import pytest
import torch

from unet.device import setup_device
from unet.errors import UserError
from unet.prediction.block_io import BlockIO, threaded_block_io


@pytest.mark.parametrize("mode, device, threaded", [
    ("auto", "cpu", False), ("auto", "cuda", True), ("auto", "npu", True),
    ("threads", "cpu", True), ("inline", "cuda", False),
])
def test_threads_by_default_only_off_the_cpu(mode, device, threaded):
    assert threaded_block_io(mode, device) is threaded


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="block I/O 'fast'"):
        threaded_block_io("fast", "cpu")


def _blocks(n: int) -> list:
    return [SimpleNamespace(index=i) for i in range(n)]  # what BlockIO uses of a Block


def _unet_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("unet-")]


def test_blocks_come_in_order_and_every_one_is_finished_before_leaving():
    dev = setup_device("cpu")
    finished = []
    with BlockIO(_blocks(7), lambda b: torch.full((1, 2, 2), float(b.index)),
                 lambda b, p: finished.append((b.index, p)), dev) as io:
        for b in io.blocks():
            x = io.take(b)
            io.finish(b, x * 2)
    assert [b for b, _ in finished] == list(range(7))
    assert all(torch.equal(p, torch.full((1, 2, 2), 2.0 * b)) for b, p in finished)
    assert _unet_threads() == []


def test_a_reader_error_is_raised_in_the_caller():
    def read(b):
        if b.index == 3:
            raise UserError("vol.zarr: slice 3 has 1 non-finite pixel(s)")
        return torch.zeros(1)

    finished = []
    with pytest.raises(UserError, match="slice 3 has 1 non-finite"):
        with BlockIO(_blocks(10), read, lambda b, p: finished.append(b.index),
                     setup_device("cpu")) as io:
            for b in io.blocks():
                io.finish(b, io.take(b))
    # Blocks before the bad one, in order, and none after it (those still queued when the reader failed are
    # dropped unrecorded: a resume redoes them).
    assert finished == list(range(len(finished))) and len(finished) <= 3
    assert _unet_threads() == []


def test_a_writer_error_stops_the_device_loop():
    def finish(b, p):
        if b.index == 2:
            raise OSError(28, "No space left on device")

    taken = []
    with pytest.raises(OSError, match="No space left"):
        with BlockIO(_blocks(1000), lambda b: torch.zeros(1), finish, setup_device("cpu")) as io:
            for b in io.blocks():
                taken.append(b)
                io.finish(b, io.take(b))
    assert len(taken) < 1000  # the loop stopped, it did not predict the rest of the volume
    assert _unet_threads() == []


def test_an_error_of_the_device_loop_propagates_and_stops_the_threads():
    with pytest.raises(RuntimeError, match="CUDA error"):
        with BlockIO(_blocks(1000), lambda b: torch.zeros(1), lambda b, p: None, setup_device("cpu")) as io:
            for b in io.blocks():
                if b.index == 4:
                    raise RuntimeError("CUDA error: an illegal memory access")
                io.finish(b, io.take(b))
    assert _unet_threads() == []
