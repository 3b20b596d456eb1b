"""Stack prediction as a three-stage pipeline: a reader thread, the device, a writer thread.

::

    reader thread   raw pages -> [0, 1] float slices (pinned host memory off CPU)   --READ_AHEAD slices-->
    main thread     host -> device (non_blocking) -> tiles of as many slices as a batch takes -> model
                    -> stitched slice -> uint8 mask on the device (+ the probabilities only when asked)
                    -> device -> pinned host (non_blocking) + an event                 --WRITE_AHEAD slices-->
    writer thread   waits for the event, then the sink: TIFF compression, PNG overlays, instances

Every forward gets ``tile_batch`` tiles (capped by the memory budget) taken in order from however many
slices it needs, so a stack of one-tile slices runs at the full batch instead of batch 1. Each slice's tiles
are cut and stitched by :class:`unet.prediction.tiles.SliceTiles` in the same order as :func:`unet.prediction.predictor.
predict_probabilities` does, through the same :func:`unet.prediction.predictor.tile_predictor`: a slice's result
depends only on what the model returns for its tiles (tests compare the two paths).

Both queues are bounded, so host memory holds at most ``READ_AHEAD + WRITE_AHEAD`` slices and the chunk
being read, whatever the stack depth. The first exception in any stage stops all three and is raised again,
unchanged (a :class:`~unet.errors.UserError` keeps its one-line message), in the calling thread.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from unet.io.images import as_image
from unet.device import DeviceSetup
from unet.errors import UserError
from unet.prediction.predictor import (check_channels, eval_mode, mask_from_probabilities, tile_predictor,
                                      written_probabilities)
from unet.prediction.tiles import SliceTiles, predict_tiles
from unet.prediction.tiling import TilePlan, TilingOptions, slice_plan, tile_batch_size
from unet.prediction.plan_speed import PlanChoice, fastest_plan, time_call

__all__ = ["StackPredictor", "Pipe", "Stopped", "END", "READ_AHEAD", "WRITE_AHEAD", "TILE_PLANS", "copy_to_host"]

TILE_PLANS = ("speed", "flops")

READ_AHEAD = 4  # slices the reader may prepare before the device needs them
WRITE_AHEAD = 4  # predicted slices that may wait for the writer
_POLL_S = 0.1  # how often a blocked stage looks whether another one failed
END = object()

# sink(k, image, mask, probability): image (C, H, W) float32 or None, mask (H, W) uint8 (mask_from_probabilities),
# probability float32 or None: (H, W) cell probability of a two-class model, (K, H, W) of a K-class one
# (written_probabilities); called in the writer thread, in slice order.
Sink = Callable[[int, "np.ndarray | None", np.ndarray, "np.ndarray | None"], None]


class Stopped(Exception):
    """Another stage failed: leave quietly, the failure is raised in the caller."""


class Pipe:
    """The stages' shared stop flag and first error, with queue calls that give up once it is set."""

    def __init__(self):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
        self.stop.set()

    def put(self, q: queue.Queue, item) -> None:
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                pass

    def get(self, q: queue.Queue):
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                pass

    def run(self, target: Callable, *args) -> threading.Thread:
        """Start ``target(*args)`` in a daemon thread whose exception stops the pipe."""
        def body():
            try:
                target(*args)
            except Stopped:
                pass
            except BaseException as e:  # noqa: BLE001 - handed to the caller unchanged
                self.fail(e)
        thread = threading.Thread(target=body, daemon=True, name=f"unet-{target.__name__.strip('_')}")
        thread.start()
        return thread

    def close(self, threads: list[threading.Thread], outbox: queue.Queue, error: BaseException | None) -> None:
        """End the stages once the main thread's part is over.

        Without an error, the writer (``threads[-1]``, reading ``outbox``) gets END and is waited for, so every
        queued item is written; with one, it stops them all. Either way every thread is joined, then the first
        error of any stage, ``error`` included, is raised unchanged.
        """
        try:
            if error is None:
                self.put(outbox, END)
                threads[-1].join()
        except Stopped:
            pass
        finally:
            if error is not None and not isinstance(error, Stopped):
                self.fail(error)
            self.stop.set()
            for thread in threads:
                thread.join()
        if self.error is not None:
            raise self.error


def copy_to_host(tensors: list[torch.Tensor], dev: DeviceSetup) -> tuple[list[torch.Tensor], "torch.Event | None"]:
    """Device tensors on their way to pinned host memory, and the event a writer thread waits for before reading
    them (recorded on the current stream after the copies, so the device loop itself does not wait). On the CPU
    the tensors themselves and no event."""
    if dev.type == "cpu":
        return tensors, None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
    event = torch.Event(device=dev.device)
    event.record()
    return host, event


@dataclass
class _Slice:
    """A slice on its way through the device: its input, tiles and how many of them are batched already."""

    index: int
    image: np.ndarray | None  # kept for the sink (overlays) only
    host: torch.Tensor  # the (pinned) source of the asynchronous copy, alive until the slice is done
    tiles: SliceTiles
    taken: int = 0

    @property
    def open(self) -> bool:
        return self.taken < self.tiles.num_tiles


class StackPredictor:
    """Predicts stacks with tiles batched across slices; one instance serves any number of stacks.

    Args:
        model: a UNet (or :class:`~unet.prediction.ensemble.Ensemble`) on ``dev.device``; its size arithmetic plans tiles.
        dev: the device setup.
        options: tiling options; ``memory_budget_mb`` caps the batch (see :func:`unet.prediction.predictor.free_memory_budget_mb`).
        forward: called instead of ``model`` on the tiles, e.g. ``torch.compile(model)``.
        tile_plan: ``flops`` = the fewest-FLOP plan; ``speed`` = the fastest of a few plans timed on the device
            (:mod:`unet.prediction.plan_speed`), where no ``tile_size`` is given and the forward is the model's
            own or ``probe_forward`` says it may be timed (compiling every candidate shape with torch.compile
            would cost more than it saves).
        slices: slices the predictor will see (the speed probe spends at most a small share of their time).
        probe_forward: the given ``forward`` takes new shapes cheaply enough to be timed by the probe.
    """

    def __init__(self, model: torch.nn.Module, dev: DeviceSetup, options: TilingOptions | None = None, *,
                 forward: Callable[[torch.Tensor], torch.Tensor] | None = None, tile_plan: str = "flops",
                 slices: int = 1, probe_forward: bool = False):
        if tile_plan not in TILE_PLANS:
            raise ValueError(f"tile_plan must be one of {TILE_PLANS}, got {tile_plan!r}")
        self.model, self.dev = model, dev
        self.options = options or TilingOptions()
        self.predictor = tile_predictor(model, dev, forward)
        self.pad_batches = forward is not None
        self.measure = tile_plan == "speed" and self.options.tile_size is None and (forward is None or probe_forward)
        self.slices = slices
        self.choices: dict[tuple[int, int], PlanChoice] = {}

    def plan(self, height: int, width: int) -> tuple[TilePlan, int]:
        """The tile plan of a slice size and the tiles per forward pass (chosen once per size)."""
        if (height, width) not in self.choices:
            o = self.options
            if self.measure:
                choice = fastest_plan(height, width, self.model, o, self._time_forward, slices=self.slices)
            else:
                plan = slice_plan(height, width, self.model, o)
                choice = PlanChoice(plan, tile_batch_size(plan, self.model, o))
            self.choices[(height, width)] = choice
        choice = self.choices[(height, width)]
        return choice.plan, choice.batch

    def _time_forward(self, tile_size: int, batch: int) -> float:
        """Seconds of one forward pass of ``batch`` tiles of ``tile_size`` (zeros) on the device, with what
        stitching adds per tile (a weighted add into a canvas), so that many small tiles are not flattered."""
        x = torch.zeros(batch, self.model.config.in_channels, tile_size, tile_size, device=self.dev.device)
        out = self.model.output_size(tile_size) if self.model.padding == "valid" else tile_size
        canvas = torch.zeros(self.model.config.num_classes, out, out, device=self.dev.device)
        weight = torch.ones(out, out, device=self.dev.device)

        def tiles():
            for p in predict_tiles(self.predictor, x, self.options.tta):
                canvas.add_(p[:, :out, :out] * weight)
        with eval_mode(self.model), torch.inference_mode():
            return time_call(tiles, self.dev.synchronize)

    def warm_up(self, height: int, width: int) -> None:
        """One forward of a full batch of that slice size's tiles (kernel choice, compilation), synchronised."""
        plan, batch = self.plan(height, width)
        x = torch.zeros(batch, self.model.config.in_channels, plan.tile_size, plan.tile_size, device=self.dev.device)
        with eval_mode(self.model), torch.inference_mode():
            predict_tiles(self.predictor, x, self.options.tta)
        self.dev.synchronize()

    def run(self, chunks: Iterable[np.ndarray], sink: Sink, *, source: str = "input", keep_images: bool = False,
            keep_probabilities: bool = False) -> int:
        """Predict every slice of ``chunks`` and hand each to ``sink`` in the writer thread.

        Args:
            chunks: raw pages ``(b, H, W)`` or ``(b, C, H, W)`` (uint8, uint16 or float), e.g. ``iter_pages``.
            sink: receives ``(k, image, mask, probability)`` per slice, in order (see :data:`Sink`).
            source: file name for error messages.
            keep_images: pass the [0, 1] input to the sink (else None).
            keep_probabilities: copy the probabilities infer.py writes to the host for the sink (else None).

        Returns:
            The number of slices predicted.

        Raises:
            Whatever a stage raised first (e.g. a UserError from the reader or the sink).
        """
        pipe = Pipe()
        inbox: queue.Queue = queue.Queue(READ_AHEAD)
        outbox: queue.Queue = queue.Queue(WRITE_AHEAD)
        threads = [pipe.run(_read, pipe, inbox, chunks, source, keep_images, self.dev.pin_memory),
                   pipe.run(_write, pipe, outbox, sink)]
        count, error = 0, None
        try:
            with eval_mode(self.model), torch.inference_mode():
                count = self._predict(pipe, inbox, outbox, keep_probabilities, source)
        except BaseException as e:  # noqa: BLE001 - raised again by close, unless a stage failed first
            error = e
        pipe.close(threads, outbox, error)
        return count

    def _predict(self, pipe: Pipe, inbox: queue.Queue, outbox: queue.Queue, keep_probabilities: bool,
                 source: str) -> int:
        """The device loop: fill a batch from the open slices, predict, stitch, send finished slices on."""
        pending: deque[_Slice] = deque()
        state = {"plan": None, "batch": 0, "count": 0, "ended": False, "source": source}
        while True:
            pieces = self._next_batch(pipe, inbox, pending, state)
            if not pieces:
                return state["count"]
            # One copy of the tiles of every slice in the batch, straight from their canvases.
            tiles = torch.stack([v for s, start, n in pieces for v in s.tiles.tile_views(start, start + n)])
            pred = self.forward_batch(tiles, state["batch"])
            offset = 0
            for s, start, n in pieces:
                s.tiles.add(start, pred[offset:offset + n])
                offset += n
            del pieces, tiles, pred, s  # held until the next batch is built otherwise: memory would double
            while pending and pending[0].tiles.done:
                pipe.put(outbox, self._finish(pending.popleft(), keep_probabilities))

    def forward_batch(self, batch: torch.Tensor, full: int) -> torch.Tensor:
        """Predict a batch of tiles (softmax, TTA); with a compiled forward a short last batch is padded to the
        full size, since a graph specialised to one batch size would otherwise be compiled again for the
        remainder. Used by the device loop here and by block-wise prediction (:mod:`unet.prediction.volume_jobs`);
        call it under ``eval_mode`` and ``inference_mode``."""
        n = batch.shape[0]
        if self.pad_batches and n < full:
            batch = torch.cat([batch, batch.new_zeros((full - n, *batch.shape[1:]))])
        return predict_tiles(self.predictor, batch, self.options.tta)[:n]

    def _next_batch(self, pipe: Pipe, inbox: queue.Queue, pending: deque, state: dict) -> list:
        """``(slice, first tile, tiles)`` pieces of the next batch, in slice order; [] when all is done."""
        pieces, size = [], 0
        while not state["ended"] and (not state["batch"] or size < state["batch"]):
            open_slice = next((s for s in pending if s.open), None)
            if open_slice is None:
                item = pipe.get(inbox)
                if item is END:
                    state["ended"] = True
                else:
                    pending.append(self._start(item, state))
                continue
            n = min(state["batch"] - size, open_slice.tiles.num_tiles - open_slice.taken)
            pieces.append((open_slice, open_slice.taken, n))
            open_slice.taken += n
            size += n
        return pieces  # short only at the end of the stack

    def _start(self, item: tuple, state: dict) -> _Slice:
        """Copy a slice to the device and cut it into tiles (the plan comes from the stack's first slice)."""
        image, host = item
        x = host.to(self.dev.device, non_blocking=True)
        check_channels(self.model, x)
        height, width = x.shape[-2:]
        if state["plan"] is None:
            state["plan"], state["batch"] = self.plan(height, width)
        elif (height, width) != state["size"]:
            raise UserError(f"{state['source']}: slice {state['count']} is {width}x{height} but the stack's first "
                            f"slice is {state['size'][1]}x{state['size'][0]}; all slices of a stack must have the "
                            f"same size")
        state["size"] = (height, width)
        s = _Slice(state["count"], image, host, SliceTiles(x, state["plan"], self.model, self.options,
                                                           num_outputs=self.model.config.num_classes))
        state["count"] += 1
        return s

    def _finish(self, s: _Slice, keep_probabilities: bool) -> tuple:
        """A predicted slice's mask (and probability) on their way to the host, with the event to wait for."""
        probs = s.tiles.result()
        image, s.image, s.host = s.image, None, None  # the input is no longer needed here
        out = [mask_from_probabilities(probs)] + ([written_probabilities(probs)] if keep_probabilities else [])
        host, event = copy_to_host(out, self.dev)
        return s.index, image, host, event


def _read(pipe: Pipe, inbox: queue.Queue, chunks: Iterable[np.ndarray], source: str, keep_images: bool,
          pin: bool) -> None:
    """Reader thread: scale every page to [0, 1] float32 and queue it (pinned off CPU for async copies)."""
    for chunk in chunks:
        for raw in chunk:
            image = as_image(raw, source, None)  # the device loop checks the channel count against the model
            host = torch.from_numpy(image)
            pipe.put(inbox, (image if keep_images else None, host.pin_memory() if pin else host))
    pipe.put(inbox, END)


def _write(pipe: Pipe, outbox: queue.Queue, sink: Sink) -> None:
    """Writer thread: wait for each slice's copies, then hand it to the sink."""
    while (item := pipe.get(outbox)) is not END:
        index, image, host, event = item
        if event is not None:
            event.synchronize()
        sink(index, image, host[0].numpy(), host[1].numpy() if len(host) > 1 else None)
