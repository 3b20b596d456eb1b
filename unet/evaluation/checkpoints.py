"""Evaluate checkpoints on the folds they held out: :func:`evaluate_checkpoint` (one checkpoint, or an
ensemble's mean probability) with the settings of :class:`EvaluateOptions`, and :func:`find_checkpoints` (the
runs of a cross-validation folder). ``evaluate.py`` (:mod:`unet.cli.evaluate`) is the command around them.

Data directory (or own images and labels), fold (or held-out z-range, or validation set), folds, scheme and seed
are :class:`~unet.data.datasets.DataOptions` whose ``None`` fields mean "as the checkpoint was trained" (else
DataOptions' defaults). The label kind, K and ignore value are always the checkpoint's (its model predicts them).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from unet.data.datasets import DATA_GROUP, DataOptions
from unet.data.folds import fold_indices, slice_range_indices
from unet.data.labels import LabelOptions
from unet.data.own_data import load_whole_set, read_pair, source_exists
from unet.io.volumes import VolumeOptions
from unet.device import DeviceSetup
from unet.distributed import DistInfo
from unet.errors import UserError
from unet.evaluation.slices import evaluate_slices
from unet.options import option
from unet.prediction.ensemble import load_ensemble
from unet.prediction.instances import InstanceOptions
from unet.prediction.predictor import tiling_plan
from unet.prediction.tiling import TilingOptions

# Every field None: each setting as the checkpoint was trained (else DataOptions' default).
AS_TRAINED = DataOptions(data_dir=None, fold=None, folds=None, fold_scheme=None, seed=None)
# Settings chosen together: one given on the command line replaces the checkpoint's whole group (a --data-dir
# replaces the checkpoint's own images, a --val-slices its fold).
SOURCE_GROUP = ("data_dir", "train_images", "train_labels")
VALIDATION_GROUP = ("fold", "val_slices", "val_images", "val_labels")
_DEFAULTS = DataOptions()  # what a setting is when neither the command line nor the checkpoint gives it
_VOLUME = VolumeOptions()


@dataclass(frozen=True)
class EvaluateOptions:
    """evaluate.py's own settings (the shared ones are DataOptions, TilingOptions, InstanceOptions, ...).

    Attributes:
        cv_dir: folder of training runs to evaluate instead of ``--ckpt`` files.
        ensemble: score the mean probability of all checkpoints once instead of one row each.
        all_images: every slice, ignoring the fold.
        split: which ISBI volume (``"train"`` or ``"test"``).
        output: the JSON file to write, or None.
        per_image: also the metrics of every slice.
        thinned: also the ISBI challenge's thinned V_Rand / V_Info.
        instances: also V_Rand / V_Info of the seeded-watershed cell instances.
    """

    cv_dir: str | None = option(None, "folder of training runs: evaluates every DIR/*/best.pt (else last.pt), sorted "
                                      "(either this or --ckpt)", flags="--cv-dir", metavar="DIR")
    ensemble: bool = option(False, "average the probabilities of all --ckpt files and score that once (TTA applies "
                                   "to each); they must have been trained on the same data and fold",
                            flags="--ensemble", switch="on")
    all_images: bool = option(False, "evaluate every slice, ignoring the fold", flags="--all-images", switch="on",
                              group=DATA_GROUP)
    split: str = option("train", "ISBI layout: which volume (test needs test-labels.tif)", flags="--split",
                        choices=("train", "test"), group=DATA_GROUP)
    output: str | None = option(None, "write metrics, checkpoint, data, fold, device, tile plan and timing here "
                                      "(atomically)", flags=("--output", "-o"), metavar="JSON", group="output")
    per_image: bool = option(False, "also print and store metrics of every slice", flags="--per-image",
                             switch="on", group="output")
    thinned: bool = option(True, "the ISBI challenge's V_Rand / V_Info after thinning, maximised over 11 thresholds "
                                 "(about 0.5 s per 512x512 slice on a CPU core); --no-thinned skips them",
                           flags="--no-thinned", switch="off", group="metrics")
    instances: bool = option(True, "V_Rand / V_Info of the seeded-watershed cell instances (about 0.5 s per slice); "
                                   "--no-instances skips them", flags="--no-instances", switch="off", group="metrics")


def find_checkpoints(cv_dir: str | Path) -> list[Path]:
    """``cv_dir/*/best.pt`` (or ``last.pt`` where a run has no best.pt), sorted by run folder.

    Raises:
        UserError: when the folder does not exist or holds no such checkpoint.
    """
    root = Path(cv_dir)
    if not root.is_dir():
        raise UserError(f"--cv-dir {root} is not a directory; pass the folder holding one folder per fold run")
    found = []
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        for name in ("best.pt", "last.pt"):
            if (run / name).is_file():
                found.append(run / name)
                break
    if not found:
        raise UserError(f"--cv-dir {root} holds no */best.pt or */last.pt checkpoints; "
                        f"pass the --model-dir of your train.py runs, or list files with --ckpt")
    return found


def _resolve_run(data: DataOptions, all_images: bool, ckpt: dict, volume: VolumeOptions | None = None
                 ) -> dict[str, Any]:
    """The data and held-out slices to evaluate: ``data`` where given, else the checkpoint's, else the default.

    Returns:
        DataOptions' field names (plus ``labels``, a :class:`LabelOptions`), and where the data and the
        validation choice came from (``data_from``, ``fold_from``).
    """
    saved = ckpt.get("args") or {}
    if not isinstance(saved, dict):
        saved = {}
    run: dict[str, Any] = {}
    for group, key in ((SOURCE_GROUP, "data_from"), (VALIDATION_GROUP, "fold_from")):
        given = any(getattr(data, name) is not None for name in group)
        recorded = any(saved.get(name) is not None for name in group)
        run[key] = "command line" if given else "checkpoint" if recorded else "default"
        run.update({name: getattr(data, name) if given else saved.get(name) for name in group})
    for name in ("folds", "fold_scheme", "seed"):
        given = getattr(data, name)
        run[name] = given if given is not None else saved.get(name, getattr(_DEFAULTS, name))
    if all_images:
        run.update({name: None for name in VALIDATION_GROUP}, fold_from="--all-images")
    run["data_dir"] = None if run["data_dir"] is None else str(run["data_dir"])
    run["fold"] = None if run["fold"] is None else int(run["fold"])
    run.update(folds=int(run["folds"]), fold_scheme=str(run["fold_scheme"]), seed=int(run["seed"]))
    run["labels"] = LabelOptions(label_kind=saved.get("label_kind", "binary"), num_classes=saved.get("num_classes"),
                                 ignore_label=saved.get("ignore_label"))
    # Each volume choice given here replaces the checkpoint's; the ones not given are what it was trained on.
    given = volume or VolumeOptions(scale=None)
    run["volume"] = VolumeOptions(**{name: value if value is not None else saved.get(name, getattr(_VOLUME, name))
                                     for name, value in (("scale", given.scale), ("channel", given.channel),
                                                         ("time", given.time))})
    return run


def _data_options(run: dict) -> DataOptions:
    return DataOptions(**{f: run[f] for f in ("data_dir", "fold", "folds", "fold_scheme", "seed", "train_images",
                                              "train_labels", "val_images", "val_labels", "val_slices")})


def _load_data(run: dict, ckpt_path: Path, split: str, cache: dict):
    """The slices the validation indices refer to: the validation set, or the whole training data."""
    key = tuple(run[f] for f in SOURCE_GROUP + ("val_images", "val_labels")) + (split, run["labels"], run["volume"])
    if key not in cache:
        for name in ("data_dir", "train_images", "val_images"):
            d = run[name]
            if d is not None and run["data_from" if name != "val_images" else "fold_from"] == "checkpoint" \
                    and not source_exists(d):
                raise UserError(f"{d}: the data recorded in checkpoint {ckpt_path} does not exist here; pass "
                                f"--{name.replace('_', '-')}")
        # channels=None: the channel check below names the checkpoint, which the reader cannot.
        if run["val_images"] is not None:
            cache[key] = read_pair(run["val_images"], run["val_labels"], run["labels"], channels=None,
                                   volume=run["volume"])
        else:
            cache[key] = load_whole_set(_data_options(run), run["labels"], split=split, channels=None,
                                        volume=run["volume"])
    return cache[key]


def _data_description(run: dict, slices) -> str:
    own = run["val_images"] or run["train_images"]
    if own is not None:
        came_from = run["data_from"] if run["val_images"] is None else run["fold_from"]
        return f"{own} ({len(slices)} slices, from the {came_from})"
    if run["data_dir"] is None:
        h, w = slices.images[0].shape[1:]
        return (f"built-in synthetic EM data ({len(slices)} slices of {w}x{h}; no --data-dir given and "
                f"none recorded in the checkpoint)")
    return f"{run['data_dir']} ({len(slices)} slices, from the {run['data_from']})"


def _fold_description(run: dict, n_val: int) -> str:
    if run["val_images"] is not None:
        return f"the validation set {run['val_images']}: {n_val} slices"
    if run["val_slices"] is not None:
        return f"slices {run['val_slices']} (held out as a z-range): {n_val} validation slices"
    if run["fold"] is None:
        why = ("--all-images" if run["fold_from"] == "--all-images"
               else "the checkpoint was trained on all slices (no fold)")
        return f"all {n_val} slices ({why})"
    folds = "5 (nvidia)" if run["fold_scheme"] == "nvidia" else f"{run['folds']} ({run['fold_scheme']})"
    return f"fold {run['fold']} of {folds}, seed {run['seed']}: {n_val} validation slices"


def _check_channels(model: torch.nn.Module, slices, path: Path) -> None:
    want, have = model.config.in_channels, sorted({int(im.shape[0]) for im in slices.images})
    if have and have != [want]:
        got = "/".join(str(c) for c in have)
        raise UserError(f"checkpoint {path} was made for {want}-channel input but the data ({slices.source}) has "
                        f"{got}-channel images; evaluate it on {want}-channel data or use a matching checkpoint")


def _validation_indices(run: dict, num_slices: int, path: Path) -> list[int]:
    if run["val_images"] is not None or run["fold"] is None and run["val_slices"] is None:
        return list(range(num_slices))  # a validation set, or no fold: every slice
    if run["val_slices"] is not None:
        return slice_range_indices(num_slices, run["val_slices"], run["train_images"] or run["data_dir"]
                                   or "the synthetic set")[1]
    _, val = fold_indices(num_slices, run["fold"], run["folds"], run["fold_scheme"], run["seed"])
    if not val:
        raise UserError(f"fold {run['fold']} of checkpoint {path} has no validation slices")
    return val


def _tiling_record(options: TilingOptions) -> dict[str, Any]:
    """The tiling flags as the result record states them."""
    return {"tile_size": options.tile_size, "tile_batch": options.tile_batch, "overlap": options.overlap,
            "blend": options.blend, "tta": options.tta}


def _check_same_fold(paths: list[Path], ckpts: list[dict], num_slices: int) -> None:
    """Members of an ensemble must have held out the same slices of the same data (as trained, not overridden)."""

    def held_out(ckpt: dict) -> tuple:
        run = _resolve_run(AS_TRAINED, False, ckpt)
        source = run["val_images"] or run["train_images"] or run["data_dir"]
        data = None if source is None else str(Path(source).resolve())
        if run["val_images"] is None and run["fold"] is None and run["val_slices"] is None:
            return data or "built-in synthetic data", []  # trained on all slices: nothing held out
        return data or "built-in synthetic data", _validation_indices(run, num_slices, paths[0])

    first = held_out(ckpts[0])
    for path, ckpt in zip(paths[1:], ckpts[1:]):
        other = held_out(ckpt)
        if other != first:
            raise UserError(f"--ensemble: checkpoints {paths[0]} and {path} were trained on different data or folds "
                            f"({first[0]}, validation slices {first[1]} vs {other[0]}, {other[1]}); an ensemble "
                            f"is scored on slices all its members held out: pass checkpoints of one fold")


def _say_header(say, paths: list[Path], model, run: dict, slices, n_val: int, plans: dict, tta: bool) -> None:
    params = sum(p.numel() for p in model.parameters())
    what = (f"UNet, {params:,} parameters" if len(paths) == 1
            else f"ensemble of {len(paths)} UNets (mean probability), {params:,} parameters in all")
    say(f"checkpoint: {', '.join(map(str, paths))} ({what}, {model.config.padding} padding, "
        f"{model.config.in_channels} channel(s))")
    say(f"data:       {_data_description(run, slices)}")
    say(f"evaluating: {_fold_description(run, n_val)}")
    say("tiles:      " + "; ".join(f"{size} slices: {p['description']}" for size, p in plans.items())
        + (", 8x test-time augmentation" if tta else ""))


def evaluate_checkpoint(paths: Path | Sequence[Path], options: EvaluateOptions, dev: DeviceSetup, dist: DistInfo, *,
                        data: DataOptions = AS_TRAINED, tiling: TilingOptions = TilingOptions(),
                        instances: InstanceOptions = InstanceOptions(), volume: VolumeOptions | None = None,
                        cache: dict | None = None, say=print) -> dict[str, Any]:
    """Evaluate one checkpoint (or an ensemble of several, their mean probability) on its fold.

    Args:
        paths: one checkpoint, or the members of an ensemble (they must share data and fold).
        options: split, ``all_images``, ``per_image``, ``thinned``, ``instances`` (the others are the command's).
        dev: the device setup.
        dist: this process's rank and world size (every rank must call this).
        data: data directory and fold; None fields: the checkpoint's.
        tiling: whole-slice tiling (``tile_size`` is checked against every slice size first).
        instances: the seeded-watershed settings of the instance scores (used when ``options.instances``).
        volume: the level, channel and time point of chunked data volumes; None fields: the checkpoint's.
        cache: slices already read, by data directory and split (shared over calls).
        say: prints the header lines (rank 0's printer under torchrun).

    Returns:
        the JSON-able result record.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    cache = {} if cache is None else cache
    start = time.perf_counter()
    model, ckpts = load_ensemble(paths)
    run = _resolve_run(data, options.all_images, ckpts[0], volume)
    slices = _load_data(run, paths[0], options.split, cache)
    if len(paths) > 1:
        _check_same_fold(paths, ckpts, len(slices))
    _check_channels(model, slices, paths[0])
    val = _validation_indices(run, len(slices), paths[0])
    subset = slices.subset(val)
    model = dev.prepare_model(model)
    sizes = sorted({tuple(int(s) for s in im.shape[1:]) for im in subset.images})
    plans = {f"{w}x{h}": tiling_plan(model, h, w, tiling) for h, w in sizes}  # also checks --tile-size
    _say_header(say, paths, model, run, slices, len(val), plans, tiling.tta)
    inst = instances if options.instances else None
    result = evaluate_slices(model, subset, dev, dist=dist, per_image=options.per_image, options=tiling,
                             thinned=options.thinned, instances=inst)
    metrics, rows = result if options.per_image else (result, None)
    curves = metrics.pop("thinned_curves", None)
    dev.synchronize()
    record = _record(paths, run, slices, options.split, subset, val, tiling, plans, metrics,
                     time.perf_counter() - start)
    return _with_extras(record, paths, curves, inst, rows)


def _record(paths: list[Path], run: dict, slices, split: str, subset, val: list[int], tiling: TilingOptions,
            plans: dict, metrics: dict, seconds: float) -> dict[str, Any]:
    """The result record's main part (its key order is the JSON's)."""
    return {
        "checkpoint": " + ".join(map(str, paths)),
        "data": {"source": run["val_images"] or run["train_images"] or run["data_dir"] or "synthetic",
                 "from": run["data_from"], "split": split, "num_slices": len(slices),
                 "description": _data_description(run, slices)},
        "fold": {"fold": run["fold"], "folds": run["folds"], "scheme": run["fold_scheme"], "seed": run["seed"],
                 "val_slices": run["val_slices"], "val_images": run["val_images"], "from": run["fold_from"],
                 "val_indices": val, "val_names": subset.names},
        "tiling": {**_tiling_record(tiling), "plans": plans},
        "metrics": metrics,
        "seconds": seconds,
    }


def _with_extras(record: dict, paths: list[Path], curves: dict | None, inst: InstanceOptions | None,
                 rows: list | None) -> dict[str, Any]:
    """``record`` with the ensemble members, thinned curves, instance options and per-slice rows, where there
    are any (in the JSON's key order)."""
    if len(paths) > 1:
        record["ensemble"] = [str(p) for p in paths]
    if curves is not None:
        record["thinned_curves"] = curves
    if inst is not None:
        record["instance_options"] = dataclasses.asdict(inst)
    if rows is not None:
        record["per_image"] = rows
    return record
