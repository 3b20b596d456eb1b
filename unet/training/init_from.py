"""Fine-tuning: a new run's first weights from a train.py checkpoint or a bioimage.io package (``--init-from``),
and the encoder freeze (``--freeze-encoder-steps``).

The source's tensors are matched to the run's model by name when they are named as this project names them
(checkpoints, export.py's packages), otherwise by order: the sequence of tensor shapes in state-dict order
(convolution weights and biases, BatchNorm weights, biases and statistics) must agree one to one. Another UNet
of the same geometry qualifies when its modules are declared in the order they run: encoder, bottleneck, then per
decoder level the upsampling before its convolutions (milesial/Pytorch-UNet's ``Up`` declares ``up`` before
``conv``; ours keeps each upsampling at the end of the level below, which gives the same sequence). A network
declaring its modules in another order (all decoder convolutions before all upsamplings, as torch-em's
``UNet2d`` does, or the bottleneck last) is refused at the first position that differs, as is one that
upsamples by interpolation or with 2x2 kernels (milesial's default), whose tensors have no counterpart here.
The output layer (``out.head``, the last two tensors) is the one layer allowed to differ, and only in its
class count, and only when ``--num-classes`` says so: it is then trained afresh. Any other difference is
another architecture and is refused, naming the first layer (or position) that differs. Every source is read
without running its code: ``torch.load(weights_only=True)``, or a TorchScript program's tensors
(unet/training/init_package.py).

What an order match cannot see: shapes say nothing about the order in which a decoder level concatenates its
upsampled input and its skip (ours: upsampled first; milesial's: skip first), about activations without
parameters (ours has a ReLU after each transposed convolution, milesial's none), the padding modes or the input
normalisation. So the line printed says that the match was by order and names the first pair; whether the
start is a good one is for a validation run (``evaluate.py``) to tell.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unet.atomic import file_sha256
from unet.checkpoint import load_checkpoint
from unet.data.labels import LabelOptions
from unet.errors import UserError
from unet.training.init_package import looks_like_package, read_package

HEAD = "out.head."
# The top-level modules of unet.model.UNet: a source naming its tensors under these is matched by name.
OWN_MODULES = ("downs.", "bottleneck.", "ups.", "out.")
ARCHITECTURE_FLAGS = "--base-filters, --depth, --padding and --batch-norm"
UPSAMPLING_HINT = ("here that is an upsampling, a 3x3 stride-2 transposed convolution: a UNet that upsamples by "
                   "interpolation or with another kernel cannot be loaded")


@dataclass(frozen=True)
class InitSource:
    """Weights to start from.

    Attributes:
        path: the file or folder given.
        kind: ``checkpoint`` or ``bioimageio``.
        sha256: digest of the checkpoint file, or of the package's weights file (as its rdf.yaml declares it).
        state: the source's state dict, in its own order and with its own names.
        weight_format: a package's weights read (``pytorch_state_dict`` or ``torchscript``); None for checkpoints.
    """

    path: str
    kind: str
    sha256: str
    state: dict
    weight_format: str | None = None


def read_init(path: str) -> InitSource:
    """The weights of a train.py checkpoint or of a bioimage.io package (``.zip``, folder or rdf.yaml).

    Raises:
        UserError: a missing or unreadable file, a package without loadable weights.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"--init-from {path}: no such file or folder; give a train.py checkpoint or a bioimage.io "
                        f"package (.zip, folder or its rdf.yaml)")
    if looks_like_package(p):
        weights = read_package(path)
        return InitSource(path, "bioimageio", weights.sha256, weights.state, weights.weight_format)
    return InitSource(path, "checkpoint", file_sha256(p), load_checkpoint(p)["model"])


def named_like_ours(state: dict) -> bool:
    """Whether every tensor of ``state`` is named under one of :class:`unet.model.UNet`'s top-level modules."""
    return bool(state) and all(name.startswith(OWN_MODULES) for name in state)


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
    if extra:
        return f"layer {extra[0]} there has no counterpart here"
    return None if HEAD + "weight" in got else f"layer {HEAD}weight of this model is missing there"


def match_by_name(expected: dict, state: dict, path: str) -> dict:
    """``state`` as it is (its names are ours), after checking every layer but the head's class count.

    Raises:
        UserError: naming the first layer that is missing, extra or of another shape.
    """
    mismatch = _first_mismatch(expected, state)
    if mismatch is not None:
        raise UserError(f"--init-from {path}: another architecture than this run's ({mismatch}); pass the "
                        f"{ARCHITECTURE_FLAGS} it was trained with")
    return state


def _same_kind(a: torch.Tensor, b: torch.Tensor, head: bool) -> bool:
    """Same shape (the head's: but for the class dimension) and both floating point or both integer."""
    shape_a, shape_b = tuple(a.shape), tuple(b.shape)
    if head:
        shape_a, shape_b = shape_a[1:], shape_b[1:]
    return shape_a == shape_b and a.is_floating_point() == b.is_floating_point()


def match_by_order(expected: dict, state: dict, path: str) -> dict:
    """``state`` renamed to this model's names, pairing the i-th tensor of each (state-dict order).

    Accepted only when the whole sequence agrees one to one: same count, same shapes (the output layer's,
    the last two tensors, but for its class count) and dtype kind.

    Raises:
        UserError: naming the first position that differs (its name and shape there and here).
    """
    ours, theirs = list(expected.items()), list(state.items())
    head_from = len(ours) - 2  # out.head.weight, out.head.bias: the last two tensors of unet.model.UNet
    for i in range(max(len(ours), len(theirs))):
        here = f"{ours[i][0]} {tuple(ours[i][1].shape)}" if i < len(ours) else "nothing"
        there = f"{theirs[i][0]} {tuple(theirs[i][1].shape)}" if i < len(theirs) else "nothing"
        if i < len(ours) and i < len(theirs) and _same_kind(ours[i][1], theirs[i][1], i >= head_from):
            continue
        hint = f"; {UPSAMPLING_HINT}" if i < len(ours) and ".up.0." in ours[i][0] else ""
        raise UserError(f"--init-from {path}: another architecture than this run's (matched by order as the names "
                        f"differ; first difference at tensor {i + 1}: {there} of its {len(theirs)} vs {here} of "
                        f"this run's {len(ours)}{hint}); pass the {ARCHITECTURE_FLAGS} that give its geometry")
    # The heads' class counts must agree between weight and bias (a head is a weight and its bias).
    if len(theirs) >= 2 and theirs[-1][1].shape[:1] != theirs[-2][1].shape[:1]:
        raise UserError(f"--init-from {path}: its last two tensors ({theirs[-2][0]}, {theirs[-1][0]}) are not an "
                        f"output layer's weight and bias")
    return {name: tensor for (name, _), (_, tensor) in zip(ours, theirs)}


def apply_init(model: nn.Module, source: InitSource, labels: LabelOptions) -> tuple[dict, str]:
    """Load ``source``'s weights into ``model`` where they fit; a new class count gets a fresh output layer.

    Args:
        model: the run's freshly initialised UNet.
        source: the weights (:func:`read_init`).
        labels: this run's label options (``num_classes`` None: not given on the command line).

    Returns:
        (the record checkpoints keep: path, kind, sha256, fresh_head, matched and, for a package, weights;
        the one line to print).

    Raises:
        UserError: another architecture (naming the first differing layer or position), or a class count that
            differs from the source's without ``--num-classes``.
    """
    expected = model.state_dict()
    by_name = named_like_ours(source.state)
    state = (match_by_name if by_name else match_by_order)(expected, source.state, source.path)
    theirs, ours = int(state[HEAD + "weight"].shape[0]), int(expected[HEAD + "weight"].shape[0])
    if theirs != ours and labels.num_classes is None:
        raise UserError(f"--init-from {source.path} predicts {theirs} classes but this run {ours}; pass "
                        f"--num-classes {ours} to train a fresh output layer, or labels with {theirs} classes")
    fresh_head = theirs != ours
    kept = {k: v for k, v in state.items() if not (fresh_head and k.startswith(HEAD))}
    model.load_state_dict({**expected, **kept})
    record = {"path": str(source.path), "kind": source.kind, "sha256": source.sha256, "fresh_head": fresh_head,
              "matched": "name" if by_name else "order"}
    what = source.kind if source.weight_format is None else f"{source.kind} ({source.weight_format} weights)"
    how = "by name" if by_name else (f"by order: {len(state)} tensors, first {next(iter(source.state))} -> "
                                     f"{next(iter(expected))}")
    line = (f"init: {len(kept)} of {len(expected)} tensors from {what} {source.path} (sha256 "
            f"{source.sha256[:12]}...), matched {how}")
    if source.weight_format is not None:
        record["weights"] = source.weight_format
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
