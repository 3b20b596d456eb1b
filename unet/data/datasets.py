"""Image/label data sets in memory: the ISBI layout, ``images/`` + ``labels/`` folders, the synthetic set.

Every problem with the user's files becomes a :class:`~unet.errors.UserError` with a one-line message
that names the file, says what is wrong and what to do.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unet.data.folds import SCHEMES, parse_slice_range
from unet.data.labels import LabelOptions, label_target
from unet.data.synthetic import make_synthetic_em
from unet.distributed import env_info
from unet.errors import UserError
from unet.io.images import as_image, list_images, read_stack, scale_by_dtype
from unet.options import option, positive_int

# Slices with a side below this train and predict, but on little more than mirrored padding: warn.
MIN_SENSIBLE_SIDE = 16
DATA_GROUP = "data"


@dataclass(frozen=True)
class DataOptions:
    """Which data a run reads and which slices it holds out (train.py and evaluate.py spell them alike).

    All are part of a training run's identity. evaluate.py takes them with every default None, meaning
    "what the checkpoint was trained with". The data is ``--data-dir`` (ISBI layout or images/ + labels/),
    the built-in synthetic set, or own images and labels (``--train-images`` / ``--train-labels``: each a
    TIFF stack, a folder of TIFF/PNG files, or a chunked volume such as ``v.zarr/raw`` or ``v.h5/raw``).
    Validation: a fold, a contiguous z-range (``--val-slices``) or a separate set (``--val-images``).
    """

    data_dir: str | None = option(
        None, "ISBI 2012 folder (train-volume.tif + train-labels.tif) or images/ + labels/ folders; omitted: the "
              "built-in synthetic EM set", flags=("--data-dir", "--data_dir"), group=DATA_GROUP, identity=True)
    fold: int | None = option(None, "validation fold; omitted: no validation fold (train on all images)",
                              flags="--fold", parse=int, group=DATA_GROUP, identity=True)
    folds: int = option(5, "number of cross-validation folds", flags="--folds", parse=positive_int,
                        group=DATA_GROUP, identity=True)
    fold_scheme: str = option("disjoint", "disjoint: every image validated exactly once; nvidia: UNet_Medical's "
                                          "overlapping folds", flags=("--fold-scheme", "--fold_scheme"),
                              choices=SCHEMES, group=DATA_GROUP, identity=True)
    seed: int = option(0, "seed of the fold permutation and, in training, of weights, data stream and dropout",
                       flags="--seed", parse=int, group=DATA_GROUP, identity=True)
    train_images: str | None = option(
        None, "own training images instead of --data-dir: a TIFF stack, a folder of TIFF/PNG files (sorted by "
              "name), or a chunked volume (v.zarr/raw, img.ome.zarr, v.n5/raw, v.h5/raw)",
        flags="--train-images", metavar="PATH", group=DATA_GROUP, identity=True)
    train_labels: str | None = option(None, "labels of --train-images, slice for slice (same forms; see "
                                            "--label-kind)", flags="--train-labels", metavar="PATH",
                                      group=DATA_GROUP, identity=True)
    val_images: str | None = option(None, "own validation images (same forms as --train-images), instead of a "
                                          "fold or --val-slices", flags="--val-images", metavar="PATH",
                                    group=DATA_GROUP, identity=True)
    val_labels: str | None = option(None, "labels of --val-images", flags="--val-labels", metavar="PATH",
                                    group=DATA_GROUP, identity=True)
    val_slices: str | None = option(None, "validate on the contiguous slices A to B-1 (0-based) and train on the "
                                          "rest, instead of a fold (neighbouring EM slices are correlated: a random "
                                          "split leaks)", flags="--val-slices", parse=parse_slice_range,
                                    metavar="A:B", group=DATA_GROUP, identity=True)

@dataclass
class SliceSet:
    """A list of 2D slices (and their labels) in memory, ready for sampling or whole-slice evaluation.

    Args:
        images: float32 ``(C, H, W)`` arrays scaled to [0, 1].
        labels: uint8 ``(H, W)`` targets: classes 0..K-1 (binary: 1 = cell interior) or
            :data:`unet.data.labels.IGNORE`, or None (no labels).
        names: one name per slice (file stem, plus ``_NNN`` page index for multi-page stacks).
        source: the data directory, or ``"synthetic"``.
    """

    images: list[np.ndarray]
    labels: list[np.ndarray] | None
    names: list[str]
    source: str

    def __post_init__(self):
        if len(self.names) != len(self.images):
            raise ValueError(f"{len(self.names)} names for {len(self.images)} images")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> "SliceSet":
        """The slices at ``indices`` (in that order), sharing the arrays."""
        idx = [int(i) for i in indices]
        return SliceSet(images=[self.images[i] for i in idx],
                        labels=None if self.labels is None else [self.labels[i] for i in idx],
                        names=[self.names[i] for i in idx], source=self.source)



def _read_many(files: list[Path]) -> tuple[list[np.ndarray], list[str], list[Path]]:
    """Slices of several files, their names, and the file each slice came from."""
    slices, names, origin = [], [], []
    for f in files:
        stack = read_stack(f)
        stem = f.name.split(".")[0]
        for k in range(len(stack)):
            slices.append(stack[k])
            names.append(stem if len(stack) == 1 else f"{stem}_{k:03d}")
            origin.append(f)
    return slices, names, origin

def _as_label(raw: np.ndarray, path: Path) -> np.ndarray:
    if raw.ndim != 2:
        raise UserError(f"{path}: labels have {raw.shape[0]} channels (RGB?); "
                        f"save labels as single-channel images with 0 = membrane, 255 = cell")
    if raw.dtype == np.bool_:
        return raw.astype(np.uint8)
    values = np.unique(raw)
    if set(values.tolist()) <= {0, 1}:
        return raw.astype(np.uint8)
    if set(values.tolist()) <= {0, 255}:
        return (raw == 255).astype(np.uint8)
    shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
    raise UserError(f"{path}: label values are {{{shown}}} but must be {{0, 255}} or {{0, 1}} "
                    f"(0 = membrane); threshold the labels to binary")


def _dataset_files(root: Path, split: str) -> tuple[list[Path], list[Path] | None, str]:
    """Image files, label files (None: none found) and the message for missing labels of a data folder."""
    volume = root / f"{split}-volume.tif"
    if volume.exists() or (root / "train-volume.tif").exists():
        image_files = [volume]
        label_path = root / f"{split}-labels.tif"
        label_files = [label_path] if label_path.exists() else None
        if not volume.exists():
            raise UserError(f"{volume}: file not found; the ISBI layout needs {volume.name} for split {split!r}")
        missing_labels = f"{label_path}: file not found; labels are needed here (0 = membrane, 255 = cell)"
    elif (root / "images").is_dir():
        image_files = list_images(root / "images")
        if not image_files:
            raise UserError(f"{root / 'images'}: no TIFF or PNG files; put one image per slice there")
        label_dir = root / "labels"
        label_files = list_images(label_dir) if label_dir.is_dir() else None
        if label_files == []:
            label_files = None
        missing_labels = (f"{label_dir}: no label files; put one TIFF/PNG label per image there "
                          f"(0 = membrane, 255 = cell), paired by sorted file name")
    else:
        raise UserError(f"{root}: no data found; expected train-volume.tif (+ train-labels.tif) or "
                        f"images/ and labels/ folders of TIFF/PNG files")
    return image_files, label_files, missing_labels


def load_dataset(data_dir: str | Path | None, *, split: str = "train", require_labels: bool = True,
                 channels: int | None = 1, label_options: LabelOptions | None = None) -> SliceSet:
    """Load and validate a data set of 2D slices and binary labels.

    Layouts: ISBI 2012 (``train-volume.tif`` + ``train-labels.tif``; split ``test`` reads ``test-volume.tif``
    and ``test-labels.tif`` if present), or ``images/`` + ``labels/`` folders of TIFF/PNG files paired by
    sorted file name (split is ignored there).

    Args:
        data_dir: the data directory; None gives the built-in synthetic set (30 slices of 256 x 256).
        split: ``train`` or ``test`` (ISBI layout).
        require_labels: fail when there are no labels (training, evaluation); otherwise labels may be None.
        channels: channels every image must have (1: grayscale); None accepts any consistent count.
        label_options: the label kind, K and ignore value (:func:`unet.data.labels.label_target`); None: binary
            {0, 255} / {0, 1} labels as always (and their messages).

    Returns:
        A validated :class:`SliceSet`.

    Raises:
        UserError: naming the file for any missing, unreadable or inconsistent input.
    """
    if split not in ("train", "test"):
        raise UserError(f"split {split!r} is not known; use 'train' or 'test'")
    if data_dir is None:
        return synthetic_dataset()
    root = Path(data_dir)
    if not root.exists():
        raise UserError(f"{root}: data directory not found; check --data-dir "
                        f"(or run datasets/isbi2012.py --data-dir {root} to download ISBI 2012)")
    if not root.is_dir():
        raise UserError(f"{root}: is not a directory; --data-dir takes a folder with train-volume.tif "
                        f"or images/ and labels/")

    image_files, label_files, missing_labels = _dataset_files(root, split)
    if label_files is None and require_labels:
        raise UserError(missing_labels)

    if label_files is not None and len(image_files) > 1:
        _warn_unpaired_names(image_files, label_files)
    raw_images, names, image_origin = _read_many(image_files)
    images = [as_image(r, o, channels) for r, o in zip(raw_images, image_origin)]
    if channels is None and len({im.shape[0] for im in images}) > 1:
        raise UserError(f"{root}: images have different channel counts; convert them all to the same")
    labels = None
    if label_files is not None:
        raw_labels, _, label_origin = _read_many(label_files)
        if len(raw_labels) != len(raw_images):
            where = label_files[0] if len(label_files) == 1 else label_files[0].parent
            raise UserError(f"{where}: {len(raw_labels)} label slices for {len(raw_images)} image slices; "
                            f"every image slice needs exactly one label")
        labels = []
        for img, raw, lo, io_ in zip(images, raw_labels, label_origin, image_origin):
            lab = _as_label(raw, lo) if label_options is None else label_target(raw, lo, label_options)
            if lab.shape != img.shape[1:]:
                raise UserError(f"{lo}: label size {lab.shape[1]}x{lab.shape[0]} differs from image size "
                                f"{img.shape[2]}x{img.shape[1]} of {io_.name}; labels must match their images")
            labels.append(lab)
    _warn_small_slices(images, image_origin)
    return SliceSet(images=images, labels=labels, names=names, source=str(root))


def synthetic_dataset(count: int = 30, size: int = 256, seed: int = 0) -> SliceSet:
    """The built-in synthetic data set (what ``load_dataset(None)`` returns).

    Args:
        count: number of slices.
        size: height and width.
        seed: generator seed.

    Returns:
        A :class:`SliceSet` with source ``"synthetic"``.
    """
    images, labels = make_synthetic_em(count, size, size, seed)
    return SliceSet(images=[scale_by_dtype(im[None]) for im in images],
                    labels=[(lab == 255).astype(np.uint8) for lab in labels],
                    names=[f"synthetic_{k:03d}" for k in range(count)], source="synthetic")


def _warn(message: str) -> None:
    """One line on stderr, from rank 0 only (every rank loads the data set)."""
    if env_info().is_main:
        print(f"warning: {message}", file=sys.stderr)


def _warn_small_slices(images: list[np.ndarray], origin: list[Path]) -> None:
    small = [(im, o) for im, o in zip(images, origin) if min(im.shape[1:]) < MIN_SENSIBLE_SIDE]
    if small:
        im, o = small[0]
        _warn(f"{o}: {len(small)} slice(s) smaller than {MIN_SENSIBLE_SIDE} pixels on a side "
              f"(first: {im.shape[2]}x{im.shape[1]}); crops of them are mostly mirrored padding")


def _warn_unpaired_names(image_files: list[Path], label_files: list[Path]) -> None:
    # Pairing is by sorted position; names sharing no stem at all suggest two unrelated folders.
    stems = {f.name.split(".")[0] for f in image_files}
    if not stems & {f.name.split(".")[0] for f in label_files}:
        _warn(f"{label_files[0].parent}: no label file has the name of an image file; images and labels are "
              f"paired by sorted name ({image_files[0].name} with {label_files[0].name}), check the pairing")
