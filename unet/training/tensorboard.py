"""TensorBoard event files beside metrics.jsonl: losses, learning rate, validation metrics, a few predictions.

torch-em, pytorch_connectomics and PlantSeg users watch a run in TensorBoard, so a run writes its event files to
``model_dir/tensorboard`` (``tensorboard --logdir <model_dir>``). metrics.jsonl stays the record the project
reads back (curves.png, resume); the event files only mirror it. The ``tensorboard`` package is optional: without
it nothing is written and one line says how to turn it on. A resumed run purges the events logged after the
checkpoint it resumes from, as metrics.jsonl drops those lines, so a curve never shows a step twice.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Callable

import numpy as np

from unet.atomic import write_error
from unet.data.labels import IGNORE
from unet.prediction.predictor import predict_probabilities

__all__ = ["TensorBoardLog", "open_tensorboard", "tensorboard_installed", "panel", "validation_pictures", "FOLDER",
           "HOW_TO_TURN_ON", "PICTURES"]

PICTURES = 2  # validation slices shown at every validation (each costs one whole-slice prediction)

FOLDER = "tensorboard"
HOW_TO_TURN_ON = "TensorBoard logging is off: pip install tensorboard to write event files (--no-tensorboard hides this)"


def tensorboard_installed() -> bool:
    """Whether the ``tensorboard`` package (which torch's SummaryWriter writes through) can be imported."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """Writes metrics.jsonl's records and validation pictures as TensorBoard events.

    Args:
        folder: the event folder (``model_dir/tensorboard``).
        resume_step: the step a resumed run restarts from (later events are purged); None for a fresh run.
    """

    def __init__(self, folder: str | Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
        self.writer = SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)

    def record(self, record: dict) -> None:
        """One metrics.jsonl record: ``train`` -> train/loss, train/lr, ...; ``val`` -> val/<metric>."""
        step = int(record["step"])
        if record.get("kind") == "train":
            scalars = {f"train/{k}": v for k, v in record.items() if k not in ("kind", "step")}
        elif record.get("kind") == "val":
            scalars = {f"val/{k}": v for k, v in record.get("val", {}).items()}
        else:
            return
        for tag, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def pictures(self, step: int, pictures: dict[str, np.ndarray]) -> None:
        """Validation pictures: name -> ``(H, W, 3)`` uint8 (see :func:`panel`)."""
        for name, picture in pictures.items():
            self.writer.add_image(f"val_images/{name}", picture, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(model_dir: Path, wanted: bool | None, resume_step: int | None,
                     say: Callable[[str], None]) -> TensorBoardLog | None:
    """The run's TensorBoard log, or None.

    Args:
        model_dir: the run folder (events go to its ``tensorboard`` subfolder).
        wanted: True = required, False = off, None = on when the package is installed (else one line says how).
        resume_step: as for :class:`TensorBoardLog`.
        say: rank 0's printer.

    Raises:
        ImportError: ``wanted`` is True and the package is missing (the caller turns it into one line).
        UserError: the event folder cannot be written (naming it).
    """
    if wanted is False:
        return None
    if not tensorboard_installed():
        if wanted:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard")
        say(HOW_TO_TURN_ON)
        return None
    folder = Path(model_dir) / FOLDER
    try:
        return TensorBoardLog(folder, resume_step)
    except OSError as e:  # a read-only or full --model-dir: one line, as for metrics.jsonl and checkpoints
        raise write_error(folder, e) from None


def panel(image: np.ndarray, probability: np.ndarray, target: np.ndarray | None, ignore: int = 255) -> np.ndarray:
    """Input | cell probability | target side by side as one ``(H, 3W, 3)`` uint8 picture.

    Args:
        image: ``(C, H, W)`` or ``(H, W)`` input in [0, 1] (the first channel is shown).
        probability: ``(H, W)`` probability of the class shown, in [0, 1].
        target: ``(H, W)`` class indices (shown spread over the grey range, ignored pixels in red), or None.
        ignore: the target value of ignored pixels.
    """
    grey = image[0] if image.ndim == 3 else image
    parts = [np.repeat(grey[..., None], 3, axis=2), np.repeat(probability[..., None], 3, axis=2)]
    if target is not None:
        known = target != ignore
        top = max(int(target[known].max()) if known.any() else 1, 1)
        shown = np.repeat((np.where(known, target, 0) / top)[..., None], 3, axis=2)
        shown[~known] = (1.0, 0.0, 0.0)
        parts.append(shown)
    return (np.clip(np.concatenate(parts, axis=1), 0, 1) * 255 + 0.5).astype(np.uint8)


def validation_pictures(model, slices, dev, options, count: int = PICTURES) -> dict[str, np.ndarray]:
    """:func:`panel` pictures of the first ``count`` validation slices: input | prediction | target.

    The prediction shown is the cell probability for two classes, the class map (spread over the grey range)
    for more.

    Args:
        model: the unwrapped UNet on ``dev.device``.
        slices: the validation :class:`~unet.data.datasets.SliceSet`.
        dev: the device setup.
        options: the run's tiling options.
        count: how many slices.
    """
    pictures = {}
    for k in range(min(count, len(slices))):
        probs = predict_probabilities(model, slices.images[k], dev, options).float().cpu()
        classes = probs.shape[0]
        shown = probs[1] if classes == 2 else probs.argmax(0).float() / (classes - 1)
        labels = slices.labels[k] if slices.labels is not None else None
        pictures[slices.names[k]] = panel(slices.images[k], shown.numpy(), labels, ignore=IGNORE)
    return pictures
