"""A run's checkpoints: finding the run to resume (and refusing a different one), writing and reading back
the trainer's state. Rank 0 reads and writes; every rank agrees on the outcome."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from unet.atomic import make_folder
from unet.checkpoint import load_checkpoint, save_checkpoint
from unet.data.datasets import DataOptions
from unet.data.labels import LabelOptions
from unet.device import DeviceOptions
from unet.distributed import DistInfo, barrier, broadcast_object
from unet.errors import UserError
from unet.options import flag_of
from unet.training.background_save import BackgroundCheckpointer
from unet.training.config import RUN_IDENTITY, RunConfig, identity_default


def find_run(config: RunConfig, model_dir: Path) -> dict | None:
    """The checkpoint to resume from, None to start fresh; refuses to clobber a different run.

    Args:
        config: this run's settings.
        model_dir: the run folder.

    Returns:
        ``model_dir/last.pt`` loaded, or None.
    """
    last = model_dir / "last.pt"
    if config.overwrite:
        return None
    if not last.exists():
        if config.resume:
            raise UserError(f"--resume: there is no {last} to resume from; drop --resume to start a new run")
        return None
    ckpt = load_checkpoint(last)
    saved = {k: ckpt.get("args", {}).get(k, identity_default(k)) for k in RUN_IDENTITY}
    diff = [f"{_setting(k)} {saved[k]!r} there vs {v!r} now" for k, v in config.identity().items()
            if saved[k] != v]
    if diff:
        raise UserError(f"{model_dir} holds a different run ({'; '.join(diff[:3])}); pass the same arguments to "
                        f"resume it, --overwrite to start over, or another --model-dir")
    return ckpt


def restore(config: RunConfig, dist: DistInfo, model_dir: Path) -> dict | None:
    """The checkpoint to resume from (None: a fresh run); every rank agrees before touching the model."""
    resume = None
    if dist.is_main and not config.benchmark:
        make_folder(model_dir, "--model-dir")
        resume = find_run(config, model_dir)
    resume_step = broadcast_object(resume["step"] if resume is not None else None)
    if resume_step is not None and resume is None:
        resume = load_checkpoint(model_dir / "last.pt")
    return resume


def load_state(resume: dict, optimizer: torch.optim.Optimizer, scaler) -> tuple[int, float, int | None]:
    """Optimizer and scaler state of a checkpoint loaded in place.

    Returns:
        (step, best dice_nvidia, its step); ``best_dice`` in older checkpoints.
    """
    optimizer.load_state_dict(resume["optimizer"])
    if resume.get("scaler"):
        scaler.load_state_dict(resume["scaler"])
    best = resume.get("best_dice_nvidia", resume.get("best_dice", -math.inf))
    return int(resume["step"]), best, resume.get("best_step")


def save(path: Path, model: torch.nn.Module, dist: DistInfo, saver: BackgroundCheckpointer | None,
         **state) -> None:
    """Rank 0 writes ``path`` (on the saver's thread when given); every rank waits for the request.

    Args:
        path: the checkpoint file.
        model: the (unwrapped) model.
        dist: this process's place in the job.
        saver: rank 0's background writer while training, or None (written here).
        **state: the trainer's state (step, optimizer, scaler, rng, args, metrics, best score, summary).
    """
    if dist.is_main:
        if saver is not None:  # a host snapshot now, the file written on the saver's thread
            saver.save(path, model, **state)
        else:
            save_checkpoint(path, model, **state)
    barrier()


def _setting(key: str) -> str:
    """The flag of an identity key, for messages; a plain name for keys no flag sets (world_size)."""
    flags = (flag_of(cls, key) for cls in (DataOptions, LabelOptions, RunConfig, DeviceOptions))
    return next((f for f in flags if f), key.replace("_", " "))
