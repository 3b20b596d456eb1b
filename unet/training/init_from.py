"""Fine-tuning: a new run's first weights from a train.py checkpoint or this project's bioimage.io package
(``--init-from``), and the encoder freeze (``--freeze-encoder-steps``).

Weights are loaded where names and shapes agree with the run's model. The output layer (``out.head``) is the
one layer allowed to differ, and only in its class count, and only when ``--num-classes`` says so: it is then
trained afresh. Any other difference is another architecture and is refused, naming the first layer that
differs. Both sources are read with ``torch.load(weights_only=True)``: opening them runs no code.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unet.atomic import file_sha256
from unet.checkpoint import load_checkpoint
from unet.data.labels import LabelOptions
from unet.errors import UserError

# The packaged network (unet.export.bioimageio_network.BioimageioUNet) holds the UNet as ``.unet`` and writes
# its state dict as weights.pt; the TorchScript file (weights_torchscript.pt) is a program, not a state dict.
PACKAGE_WEIGHTS = "weights.pt"
PACKAGE_PREFIX = "unet."
HEAD = "out.head."
ARCHITECTURE_FLAGS = "--base-filters, --depth, --padding and --batch-norm"


@dataclass(frozen=True)
class InitSource:
    """Weights to start from.

    Attributes:
        path: the file or folder given.
        kind: ``checkpoint`` or ``bioimageio``.
        sha256: digest of the weights file (a package's zip itself, or its weights.pt when a folder).
        state: the UNet's state dict (names as :class:`unet.model.UNet` has them).
    """

    path: str
    kind: str
    sha256: str
    state: dict


def read_init(path: str) -> InitSource:
    """The weights of a train.py checkpoint or of a bioimage.io package (``.zip`` or unpacked folder).

    Raises:
        UserError: a missing or unreadable file, a package without a state-dict weights file.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"--init-from {path}: no such file or folder; give a train.py checkpoint or a bioimage.io "
                        f"package (.zip or folder)")
    if p.is_dir():
        weights = p / PACKAGE_WEIGHTS
        if not weights.is_file():
            raise UserError(f"--init-from {path}: the folder has no {PACKAGE_WEIGHTS}; give a bioimage.io package "
                            f"exported by export.py (pytorch_state_dict weights) or a train.py checkpoint file "
                            f"(e.g. {p / 'best.pt'})")
        return InitSource(path, "bioimageio", file_sha256(weights), _state_dict(weights.read_bytes(), path))
    # A torch checkpoint is a zip archive too: a package is the zip that holds weights.pt.
    data = None
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            if PACKAGE_WEIGHTS in z.namelist():
                data = z.read(PACKAGE_WEIGHTS)
    if data is not None:
        return InitSource(path, "bioimageio", file_sha256(p), _state_dict(data, path))
    if p.suffix.lower() == ".zip":
        raise UserError(f"--init-from {path}: the zip holds no {PACKAGE_WEIGHTS}; export the package with "
                        f"pytorch_state_dict weights (export.py), or give a train.py checkpoint")
    return InitSource(path, "checkpoint", file_sha256(p), load_checkpoint(p)["model"])


def _state_dict(data: bytes, path: str) -> dict:
    """A package's state dict, its ``unet.`` prefix removed."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--init-from {path}: {PACKAGE_WEIGHTS} cannot be read as a weights-only state dict "
                        f"({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--init-from {path}: {PACKAGE_WEIGHTS} is not a state dict of tensors")
    return {k[len(PACKAGE_PREFIX):] if k.startswith(PACKAGE_PREFIX) else k: v for k, v in state.items()}


def _first_mismatch(expected: dict, got: dict) -> str | None:
    """The first layer (model order) outside the output layer that is missing, extra or of another shape."""
    for name, tensor in expected.items():
        if name.startswith(HEAD):
            continue
        if name not in got:
            return f"layer {name} of this model is missing there"
        if tuple(got[name].shape) != tuple(tensor.shape):
            return f"layer {name} is {tuple(got[name].shape)} there but {tuple(tensor.shape)} here"
    extra = [name for name in got if name not in expected]
    return f"layer {extra[0]} there has no counterpart here" if extra else None


def apply_init(model: nn.Module, source: InitSource, labels: LabelOptions) -> tuple[dict, str]:
    """Load ``source``'s weights into ``model`` where they fit; a new class count gets a fresh output layer.

    Args:
        model: the run's freshly initialised UNet.
        source: the weights (:func:`read_init`).
        labels: this run's label options (``num_classes`` None: not given on the command line).

    Returns:
        (the record checkpoints keep: path, kind, sha256, fresh_head; the one line to print).

    Raises:
        UserError: another architecture (naming the first differing layer), or a class count that differs
            from the source's without ``--num-classes``.
    """
    expected = model.state_dict()
    mismatch = _first_mismatch(expected, source.state)
    if mismatch is None and HEAD + "weight" not in source.state:
        mismatch = f"layer {HEAD}weight of this model is missing there"
    if mismatch is not None:
        raise UserError(f"--init-from {source.path}: another architecture than this run's ({mismatch}); pass the "
                        f"{ARCHITECTURE_FLAGS} it was trained with")
    theirs, ours = int(source.state[HEAD + "weight"].shape[0]), int(expected[HEAD + "weight"].shape[0])
    if theirs != ours and labels.num_classes is None:
        raise UserError(f"--init-from {source.path} predicts {theirs} classes but this run {ours}; pass "
                        f"--num-classes {ours} to train a fresh output layer, or labels with {theirs} classes")
    fresh_head = theirs != ours
    kept = {k: v for k, v in source.state.items() if not (fresh_head and k.startswith(HEAD))}
    model.load_state_dict({**expected, **kept})
    record = {"path": str(source.path), "kind": source.kind, "sha256": source.sha256, "fresh_head": fresh_head}
    line = (f"init: {len(kept)} of {len(expected)} tensors from {source.kind} {source.path} (sha256 "
            f"{source.sha256[:12]}...)")
    if fresh_head:
        line += f"; fresh output layer for {ours} classes (it predicted {theirs})"
    return record, line


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The down path's and the bottleneck's parameters: what ``--freeze-encoder-steps`` keeps fixed."""
    return [p for part in (model.downs, model.bottleneck) for p in part.parameters()]


def parameter_groups(model: nn.Module, freeze_encoder_steps: int) -> list[dict]:
    """Adam's parameter groups: one, or with a freeze the encoder's (marked ``encoder``) and the rest.

    The freeze sets the encoder group's learning rate to 0 (:func:`encoder_frozen`) rather than switching off
    its gradients: the groups and the step function stay the same for DDP, torch.compile and resumes.
    """
    if not freeze_encoder_steps:
        return [{"params": list(model.parameters())}]
    encoder = {id(p) for p in encoder_parameters(model)}
    return [{"params": [p for p in model.parameters() if id(p) in encoder], "encoder": True},
            {"params": [p for p in model.parameters() if id(p) not in encoder], "encoder": False}]


def encoder_frozen(step: int, freeze_encoder_steps: int) -> bool:
    """Whether optimizer step ``step`` (1-based) leaves the encoder alone."""
    return freeze_encoder_steps == -1 or step <= freeze_encoder_steps
