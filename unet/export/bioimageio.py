"""BioImage Model Zoo packages (bioimage.io model spec 0.5) of a trained UNet, for Fiji/deepImageJ, napari, ilastik.

``python export.py --ckpt best.pt --output unet.zip --author "Jane Doe" --license MIT`` writes a ``.zip``
holding ``rdf.yaml``, the weights (pytorch_state_dict with its architecture source, TorchScript, ONNX, each
with its SHA-256), test input/output tensors cut from a real slice, a cover picture and a README page.
The package is validated by bioimageio.spec and, unless ``--no-test``, run by bioimageio.core's
``test_model`` for every weight format before it is renamed into place; nothing is left behind otherwise.

What the package computes is what ``infer.py --probabilities`` computes:

* preprocessing is the dtype scaling of :func:`unet.io.images.scale_by_dtype` (uint8 / 255, uint16 / 65535,
  float as is), stated for the dtype of the sample slice; the model's own ``(x - mean) / std`` stays inside
  the network (``UNet.forward``), as in every other export of this project;
* the network ends in a softmax over the classes: output channel ``cell`` is infer.py's probability stack,
  channel ``membrane`` is one minus it.

How the network is tiled, and the files made from it, are :mod:`unet.export.bioimageio_network`.
"""
from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unet.atomic import atomic_path, file_sha256
from unet.checkpoint import load_model
from unet.errors import UserError
from unet.export.bioimageio_network import (ONNX_OPSET, WEIGHT_FORMATS, BioimageioUNet, PackageGeometry, Sample,
                                            load_sample, make_test_tensors, package_geometry, package_network,
                                            sample_crop, write_cover, write_weights)
from unet.model import UNet
from unet.options import flag_of, option

DTYPE_GAIN = {"uint8": 1 / 255, "uint16": 1 / 65535, "float32": None}
CITATIONS = (
    ("Ronneberger O, Fischer P, Brox T. U-Net: Convolutional Networks for Biomedical Image Segmentation. "
     "MICCAI 2015.", "10.1007/978-3-319-24574-4_28", None),
    ("Arganda-Carreras I, Turaga SC, Berger DR, et al. Crowdsourcing the creation of image segmentation "
     "algorithms for connectomics (ISBI 2012 EM segmentation challenge). Front. Neuroanat. 2015.",
     "10.3389/fnana.2015.00142", None),
    ("NVIDIA Deep Learning Examples: UNet_Medical for TensorFlow 2.", None,
     "https://github.com/NVIDIA/DeepLearningExamples/tree/master/TensorFlow2/Segmentation/UNet_Medical"),
)
TAGS = ("unet", "segmentation", "electron-microscopy", "membrane-segmentation", "2d", "pytorch", "isbi2012",
        "semantic-segmentation", "unet-em")
GROUP = "bioimage.io package (--format bioimageio)"


def weight_format_list(text: str) -> tuple[str, ...]:
    """``--weight-formats``: a comma-separated list (checked against WEIGHT_FORMATS by check_request)."""
    return tuple(f.strip() for f in text.split(",") if f.strip())


@dataclass
class PackageOptions:
    """Everything a package needs besides the checkpoint (the export.py flags, bundled).

    Args:
        authors: ``"Name[;affiliation[;github_user]]"`` each; at least one.
        license: SPDX identifier of the weights' licence (e.g. ``MIT``, ``CC-BY-4.0``).
        maintainers: ``"github_user[;Name]"`` each.
        name, description: defaults are made from the checkpoint.
        git_repo: URL of the code that trained the model.
        weight_formats: a subset of :data:`WEIGHT_FORMATS`.
        sample: a TIFF/PNG image or stack whose first slice makes the test tensors and cover; None = the
            built-in synthetic stack.
        overwrite: replace an existing output file.
        test: run bioimageio.core's ``test_model`` on the package (every weight format) before publishing it.
    """

    authors: list[str] = option(help="an author of the model (repeat for several); required", flags="--author",
                                switch="append", metavar="NAME[;AFFILIATION[;GITHUB_USER]]", group=GROUP,
                                default_factory=list)
    license: str | None = option(None, "SPDX licence of the weights (e.g. MIT, CC-BY-4.0); required",
                                 flags="--license", group=GROUP)
    maintainers: list[str] = option(help="a maintainer (repeat for several)", flags="--maintainer",
                                    switch="append", metavar="GITHUB_USER[;NAME]", group=GROUP,
                                    default_factory=list)
    name: str | None = option(None, "package name (default: made from the model)", flags="--name", group=GROUP)
    description: str | None = option(None, "one-paragraph description (default: made from the checkpoint's "
                                           "model and training data)", flags="--description", group=GROUP)
    git_repo: str | None = option(None, "URL of the code that trained the model", flags="--git-repo", group=GROUP)
    weight_formats: tuple[str, ...] = option(WEIGHT_FORMATS, "comma-separated subset of " + ", ".join(WEIGHT_FORMATS),
                                             flags="--weight-formats", parse=weight_format_list, group=GROUP)
    sample: str | None = option(None, "TIFF/PNG image or stack whose first slice makes the test tensors and the "
                                      "cover; None = the built-in synthetic stack", flags="--sample", group=GROUP)
    test: bool = option(True, "--no-test skips bioimageio.core's test of every weight format before the package "
                              "is written", flags="--no-test", switch="off", group=GROUP)
    overwrite: bool = False  # export.py's --overwrite (ExportArgs), for every format


def check_request(output: str | Path, options: PackageOptions) -> Path:
    """All checks that need no checkpoint and no work: output path, formats, metadata. Returns the path."""
    path = Path(output)
    if path.suffix.lower() != ".zip":
        raise UserError(f"{path}: unknown output format {path.suffix or '(no suffix)'!r}; a bioimage.io "
                        f"model package is a .zip file")
    if path.exists() and not options.overwrite:
        raise UserError(f"{path}: output exists; pass --overwrite to replace it or choose another name")
    if not path.parent.is_dir():
        raise UserError(f"{path}: folder {path.parent} does not exist; create it first")
    unknown = [f for f in options.weight_formats if f not in WEIGHT_FORMATS]
    if unknown or not options.weight_formats:
        raise UserError(f"--weight-formats: unknown weight format(s) {unknown or '(none given)'}; "
                        f"choose from {', '.join(WEIGHT_FORMATS)}")
    if not options.authors:
        raise UserError("--author is required (no default): who made the model, e.g. --author \"Jane Doe\"")
    if not options.license:
        raise UserError("--license is required (no default): the SPDX licence of the weights, e.g. "
                        "--license MIT or --license CC-BY-4.0")
    if any(not a.split(";")[0].strip() for a in options.authors):
        raise UserError("--author: every author needs a name before any ';affiliation;github_user'")
    if any(not m.split(";")[0].strip() for m in options.maintainers):
        raise UserError("--maintainer: every maintainer needs a GitHub user name, e.g. --maintainer janedoe")
    return path


def require_extra() -> None:
    """UserError when the ``[bioimageio]`` extra (bioimageio.core, onnx, onnxruntime) is not installed."""
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise UserError("bioimage.io export needs the bioimageio extra; pip install -e .[bioimageio]") from None


def verify_github_users(options: PackageOptions) -> None:
    """Look the GitHub user names of ``--author``/``--maintainer`` up with bioimageio.spec's own check.

    bioimageio.spec asks api.github.com about every ``github_user`` when it validates a package with I/O
    checks, and raises (rather than warns) when the host cannot be reached; checking first turns that into
    one line naming the flag, before anything is computed or written.
    """
    from bioimageio.spec._internal.field_validation import validate_github_user
    users = [a.split(";")[2].strip() for a in options.authors if len(a.split(";")) > 2 and a.split(";")[2].strip()]
    users += [m.split(";")[0].strip() for m in options.maintainers]
    for user in users:
        try:
            validate_github_user(user)
        except Exception as e:  # noqa: BLE001 - a 404 (ValueError) or no network (httpx errors) alike
            raise UserError(f"GitHub user {user!r} (--author/--maintainer) could not be verified with "
                            f"api.github.com, as bioimageio.spec requires: {_one_line(e)[:160]}; check the "
                            f"name, or leave GitHub names out where GitHub cannot be reached") from None


def checkpoint_facts(ckpt: dict) -> dict:
    """Training facts a README states: data, fold, steps, validation metrics (from the checkpoint)."""
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    metrics = ckpt.get("metrics") if isinstance(ckpt.get("metrics"), dict) else {}
    fold = args.get("fold")
    return {
        "data": args.get("data_dir") or "the built-in synthetic EM set (not real data)",
        "fold": ("all slices (no validation fold)" if fold is None else
                 f"fold {fold} of {args.get('folds', 5)} ({args.get('fold_scheme', 'disjoint')} scheme)"),
        "step": ckpt.get("step"), "max_steps": args.get("max_steps"), "batch_size": args.get("batch_size"),
        "learning_rate": args.get("learning_rate"),
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
    }


def _known(value) -> str:
    return "not recorded" if value is None else str(value)


def _targets(config) -> str:
    """What the model segments, for names and text: membranes (two classes) or its classes."""
    return "membranes" if config.num_classes == 2 else ", ".join(config.class_names)


def _structures(config) -> list[str]:
    return ["cell membranes"] if config.num_classes == 2 else list(config.class_names)


def output_text(config) -> str:
    """The output tensor described per class, as infer.py writes it."""
    names = config.class_names
    if config.num_classes == 2:
        return (f"softmax over 2 channels, '{names[0]}' and '{names[1]}'; channel '{names[1]}' is exactly what "
                f"infer.py --probabilities writes, and argmax == 1 is its mask (255)")
    listed = ", ".join(f"{k} = '{n}'" for k, n in enumerate(names))
    return (f"softmax over {config.num_classes} channels, one probability per class ({listed}); the argmax over "
            f"the channels is the class map")


def readme_text(name: str, model: UNet, geom: PackageGeometry, facts: dict, sample: Sample) -> str:
    """The package's documentation page (Markdown)."""
    c = model.config
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in facts["metrics"].items()) or "| (none recorded) | |"
    sizes = (f"{geom.min_size} + {geom.step}·n pixels per side (blocks), halo {geom.halo}" if c.padding == "valid"
             else f"multiples of {geom.step} from {geom.min_size} (blocks), halo {geom.halo}")
    return f"""# {name}

A 2D UNet (Ronneberger et al. 2015, as configured in NVIDIA's UNet_Medical) that segments {_targets(c)}
in electron-microscopy slices. Trained with unet-em and exported by its `export.py`.

## Input and output
* input `raw`: one {c.in_channels}-channel slice, axes batch, channel, y, x, {sample.dtype}. Preprocessing scales
  it by its data type (uint8 / 255, uint16 / 65535, float as is, i.e. already in [0, 1]); the network
  applies its own normalisation (x - {c.mean}) / {c.std} inside.
* output `probabilities`: {output_text(c)}.
* tiling: block sizes {sizes}; the slice is mirror-padded (`reflect`). Blocks of these sizes reproduce
  unet-em's own whole-slice prediction (the halo covers the {geom.margin}-pixel context the
  '{c.padding}' network crops itself and keeps blocks on its {geom.step}-pixel pooling grid).

## Model
{c.depth} levels, {c.base_filters} base filters, '{c.padding}' convolutions, batch norm {c.batch_norm},
{sum(p.numel() for p in model.parameters()):,} parameters.

## Training and validation
* data: {facts['data']}
* validation: {facts['fold']}
* optimizer steps: {_known(facts['step'])} (of {_known(facts['max_steps'])}), batch {_known(facts['batch_size'])}, learning rate {_known(facts['learning_rate'])}
* validation metrics of this checkpoint (whole slices of its validation fold, as train.py recorded them):

| metric | value |
|---|---|
{rows}

The test tensors and cover are from {sample.source}.

## Intended use and limits
Membrane probability maps of 2D EM slices at a resolution and contrast like the training data (ISBI 2012:
serial-section TEM of Drosophila ventral nerve cord, 4x4 nm pixels). It is not a 3D or instance
segmentation; other modalities, resolutions or stainings need retraining. A model trained on the built-in
synthetic set is for smoke tests only.
"""


# ------------------------------------------------------------------------------------------ description

def _people(options: PackageOptions):
    from bioimageio.spec.model.v0_5 import Author, Maintainer
    authors = []
    for text in options.authors:
        name, affiliation, github = (text.split(";") + ["", ""])[:3]
        authors.append(Author(name=name.strip(), affiliation=affiliation.strip() or None,
                              github_user=github.strip() or None))
    maintainers = []
    for text in options.maintainers:
        github, name = (text.split(";") + [""])[:2]
        maintainers.append(Maintainer(github_user=github.strip(), name=name.strip() or None))
    return authors, maintainers


def _tensors(model: UNet, geom: PackageGeometry, dtype: str, files: dict[str, Path]):
    """Input and output descriptions: axes, sizes, halo, data type/range, pre-/postprocessing."""
    from bioimageio.spec.model import v0_5 as s
    size = s.ParameterizedSize(min=geom.min_size, step=geom.step)
    gain = DTYPE_GAIN[dtype]
    pre = [] if gain is None else [s.EnsureDtypeDescr(kwargs=s.EnsureDtypeKwargs(dtype="float32")),
                                   s.ScaleLinearDescr(kwargs=s.ScaleLinearKwargs(gain=gain)),
                                   # Said explicitly: the spec otherwise casts back to the input's dtype.
                                   s.EnsureDtypeDescr(kwargs=s.EnsureDtypeKwargs(dtype="float32"))]
    top = {"uint8": 255.0, "uint16": 65535.0, "float32": 1.0}[dtype]
    raw = s.InputTensorDescr(
        id=s.TensorId("raw"), description="EM slice; scaled by its data type to [0, 1]",
        axes=[s.BatchAxis(), s.ChannelAxis(channel_names=[f"channel{i}" for i in range(model.config.in_channels)]),
              s.SpaceInputAxis(id=s.AxisId("y"), size=size), s.SpaceInputAxis(id=s.AxisId("x"), size=size)],
        test_tensor=_file(files["test_input"]),
        data=s.IntervalOrRatioDataDescr(type=dtype, range=(0.0, top)),
        pad=s.ReflectPadding(mode="reflect"), preprocessing=pre)
    ref = {a: s.SizeReference(tensor_id=s.TensorId("raw"), axis_id=s.AxisId(a)) for a in ("y", "x")}
    out = s.OutputTensorDescr(
        id=s.TensorId("probabilities"),
        description=(f"softmax; channel '{model.config.class_names[1]}' = infer.py --probabilities"
                     if model.config.num_classes == 2 else
                     "softmax, one channel per class (channel_names); argmax over channels = the class map"),
        axes=[s.BatchAxis(), s.ChannelAxis(channel_names=list(model.config.class_names)),
              *(s.SpaceOutputAxisWithHalo(id=s.AxisId(a), size=ref[a], halo=geom.halo) for a in ("y", "x"))],
        test_tensor=_file(files["test_output"]),
        data=s.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))
    return raw, out


def _weights(model: UNet, geom: PackageGeometry, files: dict[str, Path]):
    """WeightsDescr: the state dict (with its architecture file) is the parent of the converted formats."""
    from bioimageio.spec.model import v0_5 as s
    torch_version = s.Version(torch.__version__.split("+")[0])
    first = next(f for f in WEIGHT_FORMATS if f in files)  # the others name it as their parent
    entries = {}
    if "pytorch_state_dict" in files:
        arch = files["architecture"]
        entries["pytorch_state_dict"] = s.PytorchStateDictWeightsDescr(
            source=files["pytorch_state_dict"], sha256=file_sha256(files["pytorch_state_dict"]),
            pytorch_version=torch_version,
            architecture=s.ArchitectureFromFileDescr(
                source=arch, sha256=file_sha256(arch), callable=s.Identifier("BioimageioUNet"),
                kwargs={"config": model.config.to_dict(), "margin": geom.margin, "crop": geom.crop}))
    if "torchscript" in files:
        entries["torchscript"] = s.TorchscriptWeightsDescr(
            source=files["torchscript"], sha256=file_sha256(files["torchscript"]), pytorch_version=torch_version,
            **({"parent": first} if first != "torchscript" else {}))
    if "onnx" in files:
        entries["onnx"] = s.OnnxWeightsDescr(
            source=files["onnx"], sha256=file_sha256(files["onnx"]), opset_version=ONNX_OPSET,
            **({"parent": first} if first != "onnx" else {}))
    return s.WeightsDescr(**entries)


def _file(path: Path):
    from bioimageio.spec.model.v0_5 import FileDescr
    return FileDescr(source=path, sha256=file_sha256(path))


def describe(model: UNet, ckpt: dict, options: PackageOptions, sample: Sample, files: dict[str, Path]):
    """The bioimage.io ModelDescr of the package (local file paths; sha256 given for every file)."""
    from bioimageio.spec.model import v0_5 as s
    geom = package_geometry(model)
    authors, maintainers = _people(options)
    raw, out = _tensors(model, geom, sample.dtype, files)
    facts = checkpoint_facts(ckpt)
    # bioimageio.spec allows letters, digits, spaces and _+-() in names: class names go to the description
    what = "membranes" if model.config.num_classes == 2 else f"segmentation ({model.config.num_classes} classes)"
    name = options.name or f"unet-em {model.config.padding} UNet for EM {what}"
    description = options.description or (
        f"2D UNet ({model.config.depth} levels, {model.config.base_filters} base filters, "
        f"'{model.config.padding}' convolutions) segmenting {_targets(model.config)} in EM slices; trained on "
        f"{facts['data']}, {facts['fold']}.")
    return s.ModelDescr(
        name=name, description=description, authors=authors, maintainers=maintainers,
        license=options.license, git_repo=options.git_repo,
        cite=[s.CiteEntry(text=t, doi=s.Doi(d) if d else None, url=u) for t, d, u in CITATIONS],
        tags=list(TAGS), documentation=_file(files["readme"]), covers=[_file(files["cover"])],
        inputs=[raw], outputs=[out], weights=_weights(model, geom, files),
        config={"bioimageio": {"architecture_type": "UNet", "modality": "electron microscopy",
                               "target_structure": _structures(model.config), "task": "semantic segmentation"},
                "unet_em": {"model_config": model.config.to_dict(), "geometry": geom.__dict__,
                            "checkpoint_step": facts["step"], "validation_metrics": facts["metrics"]}})


# ------------------------------------------------------------------------------------------ building

def write_files(net: BioimageioUNet, model: UNet, ckpt: dict, options: PackageOptions, sample: Sample,
                folder: Path) -> dict[str, Path]:
    """Weights, architecture, test tensors, cover and README in ``folder``; returns role -> file."""
    geom = package_geometry(model)
    crop = sample_crop(sample, geom.step)
    files = write_weights(net, options.weight_formats, folder, geom.block_size(crop.shape[-1]))
    files["test_input"], files["test_output"] = folder / "test_input.npy", folder / "test_output.npy"
    test_input, test_output = make_test_tensors(net, crop, geom.halo)
    np.save(files["test_input"], test_input)
    np.save(files["test_output"], test_output)
    files["cover"], files["readme"] = folder / "cover.png", folder / "README.md"
    write_cover(net, sample, files["cover"])
    name = options.name or f"unet-em {model.config.padding} UNet for EM membranes"
    files["readme"].write_text(readme_text(name, model, geom, checkpoint_facts(ckpt), sample), encoding="utf-8")
    return files


def _one_line(what: object) -> str:
    """``str(what)`` on one line (whitespace runs become one space), at most 400 characters."""
    return " ".join(str(what).split())[:400]


def build_package(ckpt_path: str | Path, output: str | Path, options: PackageOptions) -> Path:
    """Write a validated (and, with ``options.test``, tested) bioimage.io model package, atomically.

    Args:
        ckpt_path: a checkpoint written by train.py.
        output: the ``.zip`` to write.
        options: metadata, weight formats, sample, overwrite and test switches.

    Returns:
        The written path.

    Raises:
        UserError: bad output path, format, metadata, checkpoint or sample, or a missing extra.
        RuntimeError: the package failed bioimageio.spec's validation or bioimageio.core's test (a bug).
    """
    path = check_request(output, options)
    model, ckpt = load_model(ckpt_path)
    require_extra()
    verify_github_users(options)
    sample = load_sample(options.sample, model.config.in_channels)
    net = package_network(model)
    with tempfile.TemporaryDirectory(prefix="unet-bioimageio-") as tmp:
        files = write_files(net, model, ckpt, options, sample, Path(tmp))
        descr = _validated_description(model, ckpt, options, sample, files)
        with atomic_path(path) as zip_tmp:
            _save_package(descr, zip_tmp)
            check_package(zip_tmp, test=options.test)
    return path


def _validated_description(model, ckpt, options, sample, files):
    """:func:`describe` inside a validation context without network look-ups; metadata errors -> UserError."""
    import pydantic
    from bioimageio.spec import ValidationContext
    # No I/O checks while building: they would look GitHub user names up online; every file's sha256 is
    # given, and the written package is validated with I/O checks by check_package.
    with ValidationContext(perform_io_checks=False):
        try:
            return describe(model, ckpt, options, sample, files)
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            loc = [str(p) for p in first["loc"]]
            flag = (flag_of(PackageOptions, loc[0]) if loc else None) or ".".join(loc)
            if loc and loc[0] == "license":
                raise UserError(f"--license {options.license!r} is not an SPDX licence identifier known to "
                                f"bioimageio.spec (e.g. MIT, CC-BY-4.0, Apache-2.0, BSD-3-Clause)") from None
            raise UserError(f"{flag}: rejected by bioimageio.spec: {_one_line(first['msg'])[:200]}") from None


def _save_package(descr, path: Path) -> None:
    from bioimageio.spec import save_bioimageio_package
    save_bioimageio_package(descr, output_path=path)


def check_package(path: Path, *, test: bool = True) -> None:
    """Validate ``path`` with bioimageio.spec (I/O checks on: hashes, files) and run core's test_model.

    Raises:
        RuntimeError: with the first failing check's message.
    """

    from bioimageio.spec import load_model_description
    descr = load_model_description(path, perform_io_checks=True)
    summary = descr.validation_summary
    if summary.status != "valid-format":
        raise RuntimeError(f"bioimageio.spec rejects the package it was given: {_one_line(summary.format())}")
    if not test:
        return
    from bioimageio.core import test_model
    for fmt in WEIGHT_FORMATS:
        if getattr(descr.weights, fmt) is None:
            continue
        with warnings.catch_warnings():
            # core's TorchScript adapter calls torch.jit.load, which torch 2.14 marks deprecated.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
            result = test_model(path, weight_format=fmt, devices=["cpu"])
        if result.status != "passed":
            failed = [d for d in result.details if d.status == "failed"]
            reason = "; ".join(f"{d.name}: {_one_line(d.errors)}" for d in failed[:2])
            raise RuntimeError(f"bioimageio.core test_model failed for {fmt} weights: {reason}")
