"""Label kinds: raw label slices as the user annotated them -> training targets of classes 0..K-1 or IGNORE.

Three kinds (``--label-kind``), as EM tools take them:

* ``binary`` (today's, ISBI 2012): {0, 255} or {0, 1} with 0 = membrane, 255/1 = cell interior.
* ``classes``: one class per value 0..K-1 (membrane, mitochondria, background, ...), K = ``--num-classes``.
* ``instances``: one id per object, 0 = background or membrane (CREMI, SNEMI3D, connected components of
  cells). The target is the binary membrane map: 1 inside an object, 0 on the background and on every
  pixel that touches another object, so that touching objects are cut apart as the UNet paper's labels are.

``--ignore-label V``: pixels with the raw value V count in no loss term and no metric. They become
:data:`IGNORE` in the target, so a slice with only a few scribbles trains on those alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unet.errors import UserError
from unet.options import option, positive_int

LABEL_KINDS = ("binary", "classes", "instances")
# The target value of ignored pixels; targets are uint8, so at most 255 classes remain for the rest.
IGNORE = 255
MAX_CLASSES = IGNORE
GROUP = "labels"


@dataclass(frozen=True)
class LabelOptions:
    """How label files are read into training targets (all three are part of a training run's identity).

    ``num_classes`` None means "not given": 2 for binary and instance labels; with ``--init-from``, a model
    whose class count differs from the init checkpoint's is refused unless ``--num-classes`` says so.
    """

    label_kind: str = option("binary", "binary: 0 = membrane, 255 (or 1) = cell; classes: values 0..K-1; "
                                       "instances: one id per object (0 = background), trained as a membrane map",
                             flags="--label-kind", choices=LABEL_KINDS, group=GROUP, identity=True)
    num_classes: int | None = option(None, "classes K the model predicts (needed with --label-kind classes; binary "
                                           "and instances have 2)", flags="--num-classes", parse=positive_int,
                                     group=GROUP, identity=True)
    ignore_label: int | None = option(None, "raw label value that counts in no loss term and no metric "
                                            "(sparse annotations, scribbles)", flags="--ignore-label", parse=int,
                                      group=GROUP, identity=True)

    def __post_init__(self):
        if self.label_kind not in LABEL_KINDS:
            raise UserError(f"--label-kind must be one of {', '.join(LABEL_KINDS)}, got {self.label_kind!r}")
        if self.num_classes is None:
            if self.label_kind == "classes":
                raise UserError("--label-kind classes needs --num-classes K (the label values are 0..K-1)")
            return
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise UserError(f"--num-classes must be from 2 to {MAX_CLASSES}, got {self.num_classes}")
        if self.label_kind != "classes" and self.num_classes != 2:
            raise UserError(f"--num-classes {self.num_classes} needs --label-kind classes ({self.label_kind} "
                            f"labels have 2 classes: membrane and cell)")

    @property
    def class_count(self) -> int:
        """K: ``num_classes``, or 2 where it was not given."""
        return 2 if self.num_classes is None else self.num_classes

    @property
    def class_names(self) -> list[str]:
        """One name per class for the model config and the per-class metric keys (``dice_<name>``)."""
        if self.label_kind != "classes":
            return ["membrane", "cell"]
        return [f"class_{k}" for k in range(self.class_count)]


def label_target(raw: np.ndarray, path: Path | str, options: LabelOptions = LabelOptions()) -> np.ndarray:
    """One raw label slice as a uint8 ``(H, W)`` target: classes 0..K-1, :data:`IGNORE` where ignored.

    Args:
        raw: the label slice as read, ``(H, W)``, any integer or bool dtype.
        path: the file it came from (for messages).
        options: the label kind, K and the ignore value.

    Returns:
        The target.

    Raises:
        UserError: a multi-channel label, a non-integer label, or values that the kind does not allow
            (naming the values and the file).
    """
    raw = _single_channel_integers(raw, path)
    ignored = raw == options.ignore_label if options.ignore_label is not None else np.zeros(raw.shape, bool)
    if options.label_kind == "binary":
        target = _binary(raw, ignored, path, options)
    elif options.label_kind == "classes":
        target = _classes(raw, ignored, path, options)
    else:
        target = instance_membrane_target(np.where(ignored, 0, raw)).astype(np.uint8)
    target[ignored] = IGNORE
    return target


def _single_channel_integers(raw: np.ndarray, path: Path | str) -> np.ndarray:
    if raw.ndim != 2:
        raise UserError(f"{path}: labels have {raw.shape[0]} channels (RGB?); save labels as single-channel "
                        f"images of integer values")
    if raw.dtype == np.bool_:
        return raw.astype(np.uint8)
    if not np.issubdtype(raw.dtype, np.integer):
        raise UserError(f"{path}: labels are {raw.dtype} but must be integers (class values or object ids)")
    return raw


def _shown(values: np.ndarray) -> str:
    return ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")


def _binary(raw: np.ndarray, ignored: np.ndarray, path, options: LabelOptions) -> np.ndarray:
    values = np.unique(raw[~ignored])
    cell = 255 if values.size and values.max() > 1 else 1
    bad = values[(values != 0) & (values != cell)]
    if bad.size:
        extra = f" or the ignore value {options.ignore_label}" if options.ignore_label is not None else ""
        raise UserError(f"{path}: label values include {{{_shown(bad)}}} but binary labels must be {{0, 255}} or "
                        f"{{0, 1}} (0 = membrane){extra}; threshold the labels, or pass --label-kind classes")
    return (raw == cell).astype(np.uint8)


def _classes(raw: np.ndarray, ignored: np.ndarray, path, options: LabelOptions) -> np.ndarray:
    values = np.unique(raw[~ignored])
    bad = values[(values < 0) | (values >= options.class_count)]
    if bad.size:
        extra = f" and not the ignore value {options.ignore_label}" if options.ignore_label is not None else ""
        raise UserError(f"{path}: label values {{{_shown(bad)}}} are outside 0..{options.class_count - 1}{extra}; "
                        f"raise --num-classes or set --ignore-label")
    return raw.astype(np.uint8)


def instance_membrane_target(instances: np.ndarray) -> np.ndarray:
    """The binary membrane target of an instance label slice: 1 inside objects, 0 on background and boundaries.

    A pixel is boundary when a 4-neighbour belongs to *another object* (both ids non-zero and different), so two
    touching objects are parted by their two edge rows, as CREMI/SNEMI3D-style dense labels need. Contact with
    the background is no boundary: the background is membrane already, and cells that annotators kept apart
    by membrane pixels (ISBI's connected components) give back exactly their binary labels.

    Args:
        instances: ``(H, W)`` integer ids, 0 = background.

    Returns:
        ``(H, W)`` uint8, 1 = object interior.
    """
    ids = np.asarray(instances)
    boundary = np.zeros(ids.shape, dtype=bool)
    for axis in (0, 1):  # each 4-neighbour pair once: rows, then columns
        a = ids[:-1] if axis == 0 else ids[:, :-1]
        b = ids[1:] if axis == 0 else ids[:, 1:]
        touching = (a != b) & (a != 0) & (b != 0)
        if axis == 0:
            boundary[:-1] |= touching
            boundary[1:] |= touching
        else:
            boundary[:, :-1] |= touching
            boundary[:, 1:] |= touching
    return ((ids != 0) & ~boundary).astype(np.uint8)


def check_some_labelled(targets: list[np.ndarray], where: Path | str) -> None:
    """Refuse a label set in which every pixel is ignored: nothing would train.

    Raises:
        UserError: naming ``where`` (the label file or folder).
    """
    if all(bool((t == IGNORE).all()) for t in targets):
        raise UserError(f"{where}: every label pixel has the ignore value; annotate some pixels, or check "
                        f"--ignore-label")
