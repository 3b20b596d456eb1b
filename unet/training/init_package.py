"""The weights of a bioimage.io model package for ``--init-from``: any UNet's, this project's or another's.

The package (``.zip``, unpacked folder, or its ``rdf.yaml`` / ``bioimageio.yaml``) is read with bioimageio.spec's
loader (model spec 0.4 and 0.5 alike). Its ``pytorch_state_dict`` weights are preferred: a state dict opened with
``torch.load(weights_only=True)``, so no code of the package runs (its architecture file is not imported). A
package with only ``torchscript`` weights gives the scripted module's ``state_dict()``: the program is loaded
but never run. Either file is checked against the SHA-256 that the package declares, as bioimageio.core checks
it before loading. Without the ``[bioimageio]`` extra only this project's own packages (``export.py``) are read,
directly from their ``weights.pt``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from unet.errors import UserError

# The formats whose file holds the tensors by themselves, in order of preference.
READABLE_FORMATS = ("pytorch_state_dict", "torchscript")
DESCRIPTION_FILES = ("rdf.yaml", "bioimageio.yaml", "model.yaml")  # as bioimageio.spec looks them up
# This project's own package (unet.export.bioimageio_network.BioimageioUNet) holds the UNet as ``.unet`` and
# writes its state dict as weights.pt.
OWN_WEIGHTS = "weights.pt"
OWN_PREFIX = "unet."


@dataclass(frozen=True)
class PackageWeights:
    """A package's tensors and where they came from.

    Attributes:
        state: the state dict, in the file's order (names as the package's network has them, except this
            project's ``unet.`` prefix, removed).
        weight_format: ``pytorch_state_dict`` or ``torchscript``.
        sha256: digest of the weights file read (checked against the package's declared one).
    """

    state: dict
    weight_format: str
    sha256: str


def looks_like_package(path: Path) -> bool:
    """Whether ``path`` is a bioimage.io package rather than a train.py checkpoint (also a zip archive)."""
    # A .zip is taken for a package even when it is not one: the package reader then says what is wrong.
    if path.is_dir() or path.name.endswith(DESCRIPTION_FILES) or path.suffix.lower() == ".zip":
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    # torch.save's archive holds <name>/data.pkl, a package its description at the top level.
    return any("/" not in n and n.endswith(DESCRIPTION_FILES) for n in names) or OWN_WEIGHTS in names


def have_spec() -> bool:
    """Whether bioimageio.spec (the ``[bioimageio]`` extra) is installed."""
    try:
        return importlib.util.find_spec("bioimageio.spec") is not None
    except ImportError:  # the parent package (bioimageio) is missing
        return False


def read_package(path: str) -> PackageWeights:
    """The tensors of the bioimage.io package at ``path`` (see the module docstring for the rules).

    Raises:
        UserError: a package bioimageio.spec rejects, one without pytorch_state_dict or torchscript weights
            (naming the formats it has), a weights file whose SHA-256 differs from the declared one, or one
            that is not a state dict of tensors.
    """
    if not have_spec():
        return _read_own_package(path)
    descr = _model_description(path)
    for weight_format in READABLE_FORMATS:
        entry = getattr(descr.weights, weight_format, None)
        if entry is not None:
            data = _verified_bytes(entry, path, weight_format)
            state = (_state_dict(data, path, weight_format) if weight_format == "pytorch_state_dict"
                     else _scripted_state_dict(data, path))
            # The digest of the bytes read: the declared one when the package declares one (it was checked).
            return PackageWeights(_without_own_prefix(state), weight_format, hashlib.sha256(data).hexdigest())
    present = [f for f, entry in descr.weights if entry is not None]
    raise UserError(f"--init-from {path}: the package has {', '.join(present) or 'no'} weights, none of "
                    f"{' or '.join(READABLE_FORMATS)}; only those two hold tensors that can be loaded here")


def _model_description(path: str):
    """bioimageio.spec's description of the model package at ``path``, or a one-line UserError."""
    from bioimageio.spec import InvalidDescr, load_description
    p = Path(path)
    if p.is_dir() and not any((p / name).is_file() for name in DESCRIPTION_FILES):
        raise UserError(f"--init-from {path}: the folder holds no {' or '.join(DESCRIPTION_FILES)}; give a "
                        f"bioimage.io package (.zip, folder or its rdf.yaml) or a train.py checkpoint file "
                        f"(e.g. {p / 'best.pt'})")
    try:
        # I/O checks off: they would hash every file and may look names up online; the weights file read
        # below is checked against its declared SHA-256 all the same.
        descr = load_description(p, perform_io_checks=False)
    except (ValueError, OSError) as e:  # no description file in the zip, unreadable YAML, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--init-from {path}: not a bioimage.io package bioimageio.spec can open ({first})") from None
    if isinstance(descr, InvalidDescr):
        raise UserError(f"--init-from {path}: bioimageio.spec rejects the package ({_first_error(descr)})")
    if getattr(descr, "type", None) != "model":
        raise UserError(f"--init-from {path}: a bioimage.io {getattr(descr, 'type', 'resource')} description, "
                        f"not a model package")
    return descr


def _first_error(descr) -> str:
    """The first validation error of a rejected description, on one line."""
    summary = getattr(descr, "validation_summary", None)
    errors = [e for d in getattr(summary, "details", []) for e in getattr(d, "errors", [])]
    text = f"{'.'.join(map(str, errors[0].loc))}: {errors[0].msg}" if errors else type(descr).__name__
    return " ".join(text.split())[:200]


def _verified_bytes(entry, path: str, weight_format: str) -> bytes:
    """The weights file's bytes; the loader's reader raises when they differ from the declared SHA-256."""
    try:
        return entry.get_reader().read()
    except ValueError as e:  # bioimageio.spec: "SHA256 mismatch for ..."
        raise UserError(f"--init-from {path}: the {weight_format} weights file does not match the SHA-256 in the "
                        f"package ({' '.join(str(e).split())[:200]})") from None
    except (OSError, KeyError) as e:
        raise UserError(f"--init-from {path}: the package's {weight_format} weights file cannot be read "
                        f"({type(e).__name__}: {e})") from None


def _state_dict(data: bytes, path: str, what: str) -> dict:
    """A weights-only state dict of tensors from ``data``."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--init-from {path}: {what} cannot be read as a weights-only state dict ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--init-from {path}: {what} is not a state dict of tensors")
    return state


def _scripted_state_dict(data: bytes, path: str) -> dict:
    """The state dict of a TorchScript program (loaded, not run)."""
    try:
        with warnings.catch_warnings():  # torch's deprecation notice for TorchScript says nothing about this file
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--init-from {path}: the torchscript weights cannot be loaded ({first})") from None
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _without_own_prefix(state: dict) -> dict:
    """``state`` with this project's ``unet.`` wrapper prefix removed (other names are kept as they are)."""
    if state and all(k.startswith(OWN_PREFIX) for k in state):
        return {k[len(OWN_PREFIX):]: v for k, v in state.items()}
    return state


def _read_own_package(path: str) -> PackageWeights:
    """Without bioimageio.spec: this project's package, its weights.pt read directly (no SHA-256 to check)."""
    p = Path(path)
    data = None
    if p.is_dir() and (p / OWN_WEIGHTS).is_file():
        data = (p / OWN_WEIGHTS).read_bytes()
    elif zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            if OWN_WEIGHTS in z.namelist():
                data = z.read(OWN_WEIGHTS)
    if data is None:
        raise UserError(f"--init-from {path}: reading another package than export.py's (no {OWN_WEIGHTS} here) "
                        f"needs bioimageio.spec: pip install -e .[bioimageio]")
    state = _state_dict(data, path, OWN_WEIGHTS)
    if not (state and all(k.startswith(OWN_PREFIX) for k in state)):  # another network's file of the same name
        raise UserError(f"--init-from {path}: its {OWN_WEIGHTS} is not export.py's (names not under "
                        f"{OWN_PREFIX!r}); reading another UNet's package needs bioimageio.spec: "
                        f"pip install -e .[bioimageio]")
    return PackageWeights(_without_own_prefix(state), "pytorch_state_dict", hashlib.sha256(data).hexdigest())
