"""A run's training and validation slices: own images and labels, and the split (fold, z-range or separate set).

Own data (``--train-images`` / ``--train-labels``, ``--val-images`` / ``--val-labels``) is each a TIFF stack, a
folder of TIFF/PNG files (sorted by name, a multi-page file contributing all its pages), or a chunked volume
(``v.zarr/raw``, ``img.ome.zarr``, ``v.n5/raw``, ``v.h5/raw``). Every file is read through the one reader layer
that inference uses (:func:`unet.io.volumes.open_volume`), and every label slice becomes a training target
through :func:`unet.data.labels.label_target` (kind, K, ignore value). ``--data-dir`` and the synthetic set
are read as before (:func:`unet.data.datasets.load_dataset`), their labels through the same targets.

Volumes are read whole into memory: training samples random crops from every slice at every step, and a
few labelled slices are what fine-tuning on own data needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unet.data.datasets import DataOptions, SliceSet, load_dataset, synthetic_dataset
from unet.data.folds import fold_indices, slice_range_indices
from unet.data.labels import LabelOptions, check_some_labelled, label_target
from unet.errors import UserError
from unet.io.images import as_image, check_finite, list_images
from unet.io.paths import parse_volume_path
from unet.io.volumes import VolumeOptions, open_volume


@dataclass
class DataSplit:
    """The slices a run trains and validates on.

    Attributes:
        train: training slices with targets.
        val: validation slices (may be empty: no validation).
        held_out: how the validation slices were chosen, for the opening line and the summary.
    """

    train: SliceSet
    val: SliceSet
    held_out: str


def check_data_options(data: DataOptions) -> None:
    """Refuse contradicting or incomplete data flags, naming them.

    Raises:
        UserError: one line naming the flags.
    """
    if data.train_images is not None and data.data_dir is not None:
        raise UserError("--train-images and --data-dir both name the training data; pass one")
    pairs = (("--train-images", data.train_images, "--train-labels", data.train_labels),
             ("--val-images", data.val_images, "--val-labels", data.val_labels))
    for images_flag, images, labels_flag, labels in pairs:
        if (images is None) != (labels is None):
            given, missing = (images_flag, labels_flag) if images is not None else (labels_flag, images_flag)
            raise UserError(f"{given} needs {missing}: images and labels come in pairs, slice for slice")
    chosen = [flag for flag, value in (("--fold", data.fold), ("--val-slices", data.val_slices),
                                       ("--val-images", data.val_images)) if value is not None]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} each choose the validation slices; pass one of them")


def read_slices(spec: str, *, labels: bool, volume: VolumeOptions = VolumeOptions()
                ) -> tuple[list[np.ndarray], list[str], list[str]]:
    """The raw slices of an image or label source, in order.

    Args:
        spec: a folder of TIFF/PNG files, or a volume path (:mod:`unet.io.paths`).
        labels: read as labels (any integer type) rather than images.
        volume: the resolution level, channel and time point of a chunked volume (``--scale``, ``--channel``,
            ``--time``). Labels take the same level and time point but never a channel: a label image has one
            value per pixel (OME-NGFF's ``labels/`` images share their image's levels and have no channel axis).

    Returns:
        (raw ``(H, W)`` or ``(C, H, W)`` slices in the stored dtype, slice names, the file or volume of each).

    Raises:
        UserError: a missing, empty or unreadable source (naming it).
    """
    slices, names, origin = [], [], []
    for source in _sources(spec):
        channel = None if labels else volume.channel
        with open_volume(source, scale=volume.scale, channel=channel, time=volume.time, labels=labels) as opened:
            stack = opened.read()
        if not labels:
            check_finite(stack, source)  # a NaN pixel would make every loss NaN
        where = parse_volume_path(source)
        stem = Path(where.container).name.split(".")[0]
        stem = f"{stem}_{where.key.replace('/', '_')}" if where.key else stem
        for k in range(len(stack)):
            slices.append(stack[k])
            names.append(stem if len(stack) == 1 else f"{stem}_{k:03d}")
            origin.append(source)
    return slices, names, origin


def source_exists(spec: str) -> bool:
    """Whether an image or label source is there: the folder or file, or a volume path's container."""
    if Path(spec).exists():
        return True
    try:
        return Path(parse_volume_path(spec).container).exists()
    except UserError:
        return False


def _sources(spec: str) -> list[str]:
    """A plain folder's TIFF/PNG files (sorted by name), else the volume path itself."""
    path = Path(spec)
    if not path.is_dir():
        return [str(spec)]
    try:
        parse_volume_path(spec)  # a zarr / N5 container is a folder too
        return [str(spec)]
    except UserError:
        files = list_images(path)
    if not files:
        raise UserError(f"{spec}: no TIFF or PNG files in this folder; give a folder of images, a TIFF stack or a "
                        f"volume such as v.zarr/raw")
    return [str(f) for f in files]


def read_pair(images: str, labels: str, options: LabelOptions, channels: int | None = 1,
              volume: VolumeOptions = VolumeOptions()) -> SliceSet:
    """Own images and their labels as a :class:`SliceSet` of targets.

    Args:
        images: the image source (see :func:`read_slices`).
        labels: the label source, one label slice per image slice.
        options: label kind, K and ignore value.
        channels: channels every image must have (None: any consistent count).
        volume: which level, channel and time point of chunked volumes (:func:`read_slices`).

    Returns:
        The slices, their targets (classes 0..K-1 or IGNORE) and names.

    Raises:
        UserError: slice counts or sizes that differ (naming both sources), bad label values (naming the
            values and the file), a label set that is all ignore value.
    """
    raw_images, names, image_origin = read_slices(images, labels=False, volume=volume)
    raw_labels, _, label_origin = read_slices(labels, labels=True, volume=volume)
    if len(raw_labels) != len(raw_images):
        raise UserError(f"{labels}: {len(raw_labels)} label slices for {len(raw_images)} image slices of {images}; "
                        f"every image slice needs exactly one label")
    slices = [as_image(raw, origin, channels) for raw, origin in zip(raw_images, image_origin)]
    if channels is None and len({im.shape[0] for im in slices}) > 1:
        raise UserError(f"{images}: images have different channel counts; convert them all to the same")
    targets = []
    for k, (image, raw, lo, io_) in enumerate(zip(slices, raw_labels, label_origin, image_origin)):
        if tuple(raw.shape[-2:]) != tuple(image.shape[1:]):
            raise UserError(f"{lo}: label slice {k} is {raw.shape[-1]}x{raw.shape[-2]} but image slice {k} of "
                            f"{io_} is {image.shape[2]}x{image.shape[1]}; labels must match their images")
        targets.append(label_target(raw, lo, options))
    check_some_labelled(targets, labels)
    return SliceSet(images=slices, labels=targets, names=names, source=str(images))


def load_whole_set(data: DataOptions, options: LabelOptions, *, split: str = "train",
                   channels: int | None = 1, volume: VolumeOptions = VolumeOptions()) -> SliceSet:
    """Every slice that training draws from or holds out: own images, ``--data-dir``, or the synthetic set.

    Raises:
        UserError: a non-binary label kind asked of the synthetic set, or any problem with the files.
    """
    if data.train_images is not None:
        return read_pair(data.train_images, data.train_labels, options, channels, volume)
    if volume.given():
        raise UserError(f"{', '.join(volume.given())}: only for chunked volumes, which --train-images and "
                        f"--val-images name (e.g. v.zarr/raw); --data-dir and the synthetic set have no levels, "
                        f"channels or time points to choose; leave it unset")
    if data.data_dir is None:
        if options.label_kind != "binary":
            raise UserError(f"--label-kind {options.label_kind} needs own labels (--train-images and "
                            f"--train-labels, or --data-dir); the built-in synthetic set has binary labels")
        return synthetic_dataset()
    whole = load_dataset(data.data_dir, split=split, channels=channels, label_options=options)
    check_some_labelled(whole.labels, data.data_dir)
    return whole


def load_split(data: DataOptions, options: LabelOptions, volume: VolumeOptions = VolumeOptions()) -> DataSplit:
    """The training and validation slices that ``data`` names, labels read as ``options`` say, chunked volumes
    read at ``volume``'s level, channel and time point (training and validation volumes alike).

    Validation: ``--val-images`` (a separate set), ``--val-slices A:B`` (a contiguous z-range of the training
    data) or ``--fold`` (a fold of it); none of them: no validation.

    Raises:
        UserError: contradicting flags, or any problem with the data.
    """
    check_data_options(data)
    whole = load_whole_set(data, options, volume=volume)
    if data.val_images is not None:
        val = read_pair(data.val_images, data.val_labels, options, channels=whole.images[0].shape[0], volume=volume)
        return DataSplit(whole, val, f"validation set {data.val_images}")
    if data.val_slices is not None:
        train, val = slice_range_indices(len(whole), data.val_slices, whole.source)
        return DataSplit(whole.subset(train), whole.subset(val), f"slices {data.val_slices} held out")
    train, val = fold_indices(len(whole), data.fold, data.folds, data.fold_scheme, data.seed)
    return DataSplit(whole.subset(train), whole.subset(val), f"fold {data.fold} of {data.folds}, {data.fold_scheme}")

