"""An endless, reproducible, resumable stream of (augmented) training tiles, and its DataLoader.

Sample ``i`` of rank ``r`` is a pure function of ``(seed, r, i)``: it draws a slice, a crop centre anywhere
on that slice and the augmentation from ``np.random.default_rng([seed, r, i])``. Hence the stream does
not depend on the number of loader workers, differs between ranks, and ``start_index = step * batch``
resumes it where a checkpoint left off. Tiles are taken at native resolution from the mirror-padded slice
(the UNet paper's overlap-tile strategy): the image is the ``input_size`` context around the
``output_size`` label crop, and crops near the border see mirrored image and mirrored label.

Sparse labels (pixels with the ignore value): on a slice with ignored pixels the crop centre is a random
labelled pixel (under augmentation the warped window is shifted so that its centre pixel samples it exactly),
so every crop's label window holds a labelled pixel, and slices with none are never drawn. Slices without
ignored pixels draw the centre anywhere, exactly as before.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unet.data.augment import AugmentConfig, intensity, sampling_grid, warp
from unet.data.datasets import SliceSet
from unet.data.labels import IGNORE
from unet.device import usable_cpus
from unet.errors import UserError


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Map any integer index into [0, n) the way ``np.pad(mode="reflect")`` does."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def _pinned(grid: torch.Tensor, j: int, pixel: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """``grid`` shifted so that tile pixel ``(j, j)`` samples the centre of source ``pixel`` exactly.

    The elastic deformation adds a displacement of ~10 px at the tile centre; on a slice with a few labelled
    pixels that would often move the label window off them. A shift keeps the warp's shape.
    """
    (y, x), (h, w) = pixel, shape
    target = torch.tensor([x * (2.0 / max(w - 1, 1)) - 1.0, y * (2.0 / max(h - 1, 1)) - 1.0], dtype=grid.dtype)
    return grid + (target - grid[0, j, j])


class TrainTiles(IterableDataset):
    """Endless stream of training tiles ``(image (C, in, in) float32, label (out, out) uint8)``, plus
    ``weight (out, out) float32`` when per-pixel weight maps are given.

    Labels travel as uint8 (class indices 0/1; the losses widen them on the device): 8x fewer host-to-device
    bytes than int64. A weight map is cropped with the label's window and mirror padding and warped with the
    label's grid (bilinear, the label nearest), so weight and label stay aligned pixel for pixel.

    Iterating it directly (or through a ``DataLoader(batch_size=None)``) gives samples ``start_index,
    start_index + 1, ...``; loader worker ``w`` of ``k`` takes every k-th sample starting at ``w``.
    :func:`build_train_loader` batches inside the workers instead (see :meth:`batches`).

    Args:
        slices: training slices with labels.
        input_size: image tile size (e.g. 572).
        output_size: label tile size (e.g. 388); ``input_size - output_size`` must be even.
        augment: True for the default :class:`AugmentConfig`, False for plain crops, or a config.
        seed: stream seed.
        rank: distributed rank; each rank draws a different stream.
        world_size: number of ranks (checked against ``rank``).
        start_index: first sample index (``step * batch_size`` when resuming).
        weights: optional ``(H, W)`` float weight map per slice (e.g. :func:`unet.weight_map.weight_map_stack`).
    """

    def __init__(self, slices: SliceSet, input_size: int, output_size: int, *, augment: bool | AugmentConfig = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, start_index: int = 0,
                 weights: list[np.ndarray] | np.ndarray | None = None):
        super().__init__()
        if slices.labels is None:
            raise UserError(f"{slices.source}: training needs labels, and this data set has none")
        if len(slices) == 0:
            raise UserError(f"{slices.source}: no slices to train on (is the training fold empty?)")
        if output_size < 1 or input_size < output_size or (input_size - output_size) % 2:
            raise ValueError(f"tile sizes {input_size} -> {output_size}: need input >= output >= 1 "
                             f"and an even difference")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.input_size, self.output_size = int(input_size), int(output_size)
        self.margin = (self.input_size - self.output_size) // 2
        self.config = AugmentConfig() if augment is True else (augment or None)
        self.seed, self.rank, self.world_size, self.start_index = int(seed), int(rank), int(world_size), int(start_index)
        # Kept as numpy for the plain-crop path and as tensors for grid_sample; labels as float for
        # grid_sample's nearest mode (the values stay exactly 0 and 1), a copy made only when augmenting.
        self._images = [np.ascontiguousarray(im, dtype=np.float32) for im in slices.images]
        self._labels = [np.ascontiguousarray(lab, dtype=np.uint8) for lab in slices.labels]
        self._timages = [torch.from_numpy(im) for im in self._images]
        self._tlabels = ([torch.from_numpy(lab.astype(np.float32))[None] for lab in self._labels]
                         if self.config is not None else [])
        self._weights = None if weights is None else [np.ascontiguousarray(w, dtype=np.float32) for w in weights]
        if self._weights is not None and [w.shape for w in self._weights] != [lab.shape for lab in self._labels]:
            raise ValueError("weights: one map per label slice, of the label's shape")
        self._tweights = ([torch.from_numpy(w)[None] for w in self._weights]
                          if self._weights is not None and self.config is not None else [])
        # Flat indices of the labelled pixels of each slice with ignored pixels (None: densely labelled).
        self._labelled = [np.flatnonzero(lab != IGNORE) if (lab == IGNORE).any() else None for lab in self._labels]
        self._drawable = [k for k, idx in enumerate(self._labelled) if idx is None or idx.size]
        if not self._drawable:
            raise UserError(f"{slices.source}: every training label pixel has the ignore value; nothing to train on")

    def sample(self, index: int) -> tuple[torch.Tensor, ...]:
        """Sample ``index`` of this rank's stream (a pure function of seed, rank and index)."""
        rng = np.random.default_rng([self.seed, self.rank, int(index)])
        k, (cy, cx) = self._crop_centre(rng)
        _, h, w = self._images[k].shape
        # Label crop [top, top + out) x [left, left + out) is centred on (cy, cx).
        top, left = cy - self.output_size // 2, cx - self.output_size // 2
        if self.config is None:
            return self._crop(k, top, left)
        size, m = self.input_size, self.margin
        centre = (top - m + (size - 1) / 2, left - m + (size - 1) / 2)
        grid = sampling_grid(rng, self.config, size, centre, (h, w))
        if self._labelled[k] is not None:  # sparse: elastic warps move the window, so pin it to the pixel
            grid = _pinned(grid, m + self.output_size // 2, (cy, cx), (h, w))
        image = warp(self._timages[k], grid, self.config.interpolation)
        label_grid = grid[:, m:m + self.output_size, m:m + self.output_size]
        label = warp(self._tlabels[k], label_grid, "nearest")[0].to(torch.uint8)
        tile = (intensity(image, rng, self.config), label)
        if self._weights is None:
            return tile
        return (*tile, warp(self._tweights[k], label_grid, "bilinear")[0])

    def _crop_centre(self, rng: np.random.Generator) -> tuple[int, tuple[int, int]]:
        """A slice and a crop centre on it: anywhere on a dense slice, on a labelled pixel of a sparse one."""
        if len(self._drawable) == len(self._images):  # the draws of dense data sets are the same as ever
            k = int(rng.integers(len(self._images)))
        else:
            k = self._drawable[int(rng.integers(len(self._drawable)))]
        _, h, w = self._images[k].shape
        labelled = self._labelled[k]
        if labelled is None:
            return k, (int(rng.integers(h)), int(rng.integers(w)))
        return k, divmod(int(labelled[rng.integers(labelled.size)]), w)

    def _crop(self, k: int, top: int, left: int) -> tuple[torch.Tensor, ...]:
        image, label = self._images[k], self._labels[k]
        m, size, out = self.margin, self.input_size, self.output_size
        iy = _mirror(np.arange(top - m, top - m + size), image.shape[1])
        ix = _mirror(np.arange(left - m, left - m + size), image.shape[2])
        ly = _mirror(np.arange(top, top + out), label.shape[0])[:, None]
        lx = _mirror(np.arange(left, left + out), label.shape[1])[None, :]
        tile = (torch.from_numpy(image[:, iy[:, None], ix[None, :]]), torch.from_numpy(label[ly, lx]))
        if self._weights is None:
            return tile
        return (*tile, torch.from_numpy(self._weights[k][ly, lx]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        i = self.start_index + wid
        while True:
            yield self.sample(i)
            i += nw

    def batch(self, number: int, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Batch ``number`` of the stream: samples ``start_index + number * batch_size`` onwards, stacked
        (images, labels and, with weight maps, weights)."""
        first = self.start_index + number * batch_size
        return tuple(torch.stack(parts) for parts in zip(*(self.sample(first + j) for j in range(batch_size))))

    def batches(self, batch_size: int) -> "TileBatches":
        """The stream grouped into batches, for loaders whose workers each build whole batches."""
        return TileBatches(self, batch_size)


class TileBatches(IterableDataset):
    """Endless batches of a :class:`TrainTiles` stream; loader worker ``w`` of ``k`` builds batches w, w+k, ...

    The DataLoader collects batches from its workers round-robin, so the batch sequence is the same for
    any number of workers (batch b always holds samples ``start_index + b*B ... + B-1``).
    """

    def __init__(self, tiles: TrainTiles, batch_size: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tiles, self.batch_size = tiles, int(batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        b = wid
        while True:
            yield self.tiles.batch(b, self.batch_size)
            b += nw


def default_workers(device_type: str) -> int:
    """Loader worker processes per rank when ``--workers`` is not given.

    Training on the CPU: 0. The model's threads already keep every core busy, so a loader process can only
    take cycles from them (on 2 cores one worker cost 15 % of an fp32 reference step, augmentation off), while
    building a batch in the training process between steps costs little: 15 ms for two 572x572 crops with
    full augmentation against a 2-7 s step (benchmarks/train_vs_plain.py measures train.py against a plain
    UNet both ways). On an accelerator the host's cores are free: one is left for the training process, the
    rest (at most 8) build batches while the device computes.

    Args:
        device_type: the training device's type (``cpu``, ``cuda``, ``npu``).
    """
    if device_type == "cpu":
        return 0
    return max(0, min(8, usable_cpus() - 1))


def build_train_loader(dataset: TrainTiles, batch_size: int, workers: int, pin_memory: bool,
                       multiprocessing_context: str | None = None) -> DataLoader:
    """An endless DataLoader of ``(images (B, C, in, in), labels (B, out, out) uint8[, weights])`` batches.

    Args:
        dataset: the tile stream (its ``start_index`` says where to resume).
        batch_size: samples per batch (per rank).
        workers: worker processes; 0 builds batches in the calling process.
        pin_memory: pin batches for faster host-to-device copies (CUDA/NPU).
        multiprocessing_context: e.g. ``"spawn"`` where forking the trainer is unsafe; None = platform default.

    Returns:
        A DataLoader whose batch sequence is independent of ``workers``.
    """
    kwargs = {}
    if workers > 0:
        # Each worker builds whole batches; a few in flight per worker hides augmentation jitter.
        kwargs = {"persistent_workers": True, "prefetch_factor": 4,
                  "multiprocessing_context": multiprocessing_context}
    return DataLoader(dataset.batches(batch_size), batch_size=None, num_workers=workers,
                      pin_memory=pin_memory, **kwargs)
