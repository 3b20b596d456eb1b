"""Checkpoints: one dict with the weights, the model config and whatever the trainer adds.

Saved atomically (temporary file in the same folder, fsync, rename) so that a crash or SIGKILL
never leaves a half-written file under the final name, and loaded with ``weights_only=True``
so that opening a checkpoint can never run code.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from unet.atomic import atomic_write
from unet.errors import UserError
from unet.model import ModelConfig, UNet

FORMAT = "unet-em-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, model: UNet, **extra) -> None:
    """Write a checkpoint atomically.

    Args:
        path: destination file.
        model: the UNet (unwrapped from DDP / torch.compile); its config and weights are saved.
        **extra: trainer state (optimizer, scaler, step, rng, args, metrics, ...), weights_only-loadable
            types only: tensors, numbers, strings, lists, tuples and dicts of them.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {"format": FORMAT, "version": VERSION, "model_config": model.config.to_dict(), "model": state, **extra}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path: str | Path) -> dict:
    """Read and check a checkpoint (on CPU).

    Raises:
        UserError: one line for a missing file, a file that is not a readable PyTorch checkpoint
            (truncated, corrupt, or holding unsafe objects), or a checkpoint that is not ours.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise _unreadable(path, e) from None
        # torch's own text suggests turning the safety off; we never pass that advice on.
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise UserError(f"checkpoint {path} was refused: it holds objects other than tensors and plain data"
                        f"{f' ({found.group(1)})' if found else ''}, and loading it could run code; use a "
                        f"checkpoint written by train.py") from None
    except Exception as e:  # noqa: BLE001 - any other failure to read is the same user-facing problem
        raise _unreadable(path, e) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not a unet-em checkpoint (it has no format={FORMAT!r} entry); "
                        f"pass a file written by train.py")
    if ckpt.get("version", 0) > VERSION:
        raise UserError(f"checkpoint {path} has format version {ckpt['version']}, newer than this unet-em "
                        f"(version {VERSION}); upgrade the package")
    for key in ("model_config", "model"):
        if key not in ckpt:
            raise UserError(f"checkpoint {path} has no {key!r} entry; it is incomplete")
    _check_finite_weights(ckpt["model"], path)
    return ckpt


def _unreadable(path: Path, e: BaseException) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated or corrupt?): {first[:200]}")


def _check_finite_weights(state: dict, path: Path) -> None:
    """Refuse NaN/Inf weights: such a model predicts NaN everywhere, which becomes an all-membrane mask."""
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} has a 'model' entry that is not a dict of tensors; it is corrupt")
    for name, t in state.items():
        # The sum is non-finite when any weight is; only then pay for the exact count (an overflow is no alarm).
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t.sum())):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise UserError(f"checkpoint {path}: weight {name!r} has {bad} non-finite value(s) (NaN or Inf); "
                                f"the run that wrote it diverged, use an earlier checkpoint")


def model_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> UNet:
    """Build the UNet a checkpoint describes and load its weights (strictly).

    Raises:
        UserError: when the config is unknown or the weights were made for another architecture.
    """
    try:
        model = UNet(ModelConfig.from_dict(ckpt["model_config"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint {path} has an invalid model config: {e}") from None
    missing, unexpected, mismatched = _compare(model.state_dict(), ckpt["model"])
    if missing or unexpected or mismatched:
        parts = [f"{label} {names[:3]}{' ...' if len(names) > 3 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected),
                                      ("shape mismatch", mismatched)) if names]
        raise UserError(f"checkpoint {path} holds weights for another architecture than its config "
                        f"({'; '.join(parts)})")
    model.load_state_dict(ckpt["model"])
    return model


def _compare(expected: dict, got: dict) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = [k for k in expected if k in got and tuple(expected[k].shape) != tuple(got[k].shape)]
    return missing, unexpected, mismatched


def load_model(path: str | Path) -> tuple[UNet, dict]:
    """Checkpoint file -> (model in eval mode on CPU, the checkpoint dict)."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, path).eval(), ckpt
