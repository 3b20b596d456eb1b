"""Whole-slice evaluation: a model and labelled slices in, segmentation metrics out (one or many folds).

:func:`predict_probabilities` is the single place that turns a model and one slice into class probabilities
(training's validation, ``evaluate.py`` and inference all go through it). :func:`evaluate_slices` shards
slices over ranks and sums the metric accumulators, so every rank gets exactly the one-process numbers.
``evaluate.py`` (:func:`main`) evaluates one checkpoint on its own fold, or several checkpoints as a
cross-validation summary (mean and sample standard deviation over folds).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from unet.atomic import atomic_write
from unet.cli.common import HelpFormatter, add_options, options_from
from unet.device import DeviceOptions
from unet.data.folds import SCHEMES, fold_indices
from unet.data.datasets import load_dataset
from unet.device import DeviceSetup, setup_device
from unet.distributed import DistInfo, all_reduce_sum, env_info, process_group, rank0_printer
from unet.prediction.ensemble import load_ensemble
from unet.errors import UserError
from unet.prediction.instances import InstanceOptions, InstanceScores
from unet.metrics.isbi import ThinnedScores
from unet.metrics.segmentation import SegmentationMetrics
from unet.prediction.predictor import predict_probabilities, tiling_plan
from unet.run_log import jsonable
from unet.prediction.tiling import TilingOptions

# Metrics summarised over cross-validation folds, with the column titles of the Markdown table.
CV_METRICS = {"dice_nvidia": "Dice (NVIDIA)", "dice_mean": "Dice (mean)", "iou_mean": "IoU (mean)",
              "pixel_error": "Pixel error", "v_rand": "V_Rand", "v_info": "V_Info",
              "v_rand_thinned": "V_Rand (thinned)", "v_info_thinned": "V_Info (thinned)",
              "v_rand_instances": "V_Rand (instances)", "v_info_instances": "V_Info (instances)"}
STD_KIND = "sample standard deviation over folds (ddof=1)"
THINNED_KEYS = ("v_rand_thinned", "v_rand_threshold", "v_info_thinned", "v_info_threshold")


# ------------------------------------------------------------------------------------------ metrics

class SliceScores:
    """All metrics of whole slices as one accumulator whose state is one float64 vector (summable over ranks).

    The state is :class:`~unet.metrics.segmentation.SegmentationMetrics`'s, then (optionally) the challenge's thinned
    scores' (:class:`~unet.metrics.isbi.ThinnedScores`) and the cell-instance scores'
    (:class:`~unet.prediction.instances.InstanceScores`). Both optional parts score the cell class's probability.

    Args:
        config: the model's config (``num_classes``, ``class_names``).
        thinned: also the ISBI challenge's V_Rand / V_Info after thinning, maximised over thresholds.
        instances: also V_Rand / V_Info of the seeded-watershed instances made with these options.
    """

    def __init__(self, config, thinned: bool = False, instances: InstanceOptions | None = None):
        self.segmentation = SegmentationMetrics(num_classes=config.num_classes, class_names=tuple(config.class_names))
        self.cell = self.segmentation.foreground_class
        self.thinned = ThinnedScores() if thinned else None
        self.instances = InstanceScores(instances) if instances is not None else None
        self._parts = [p for p in (self.thinned, self.instances) if p is not None]
        self.size = self.segmentation.state().numel() + sum(p.state().size for p in self._parts)

    def update(self, probs: torch.Tensor, labels: np.ndarray) -> None:
        """Add one slice: ``(K, H, W)`` probabilities and ``(H, W)`` class indices."""
        labels = np.asarray(labels)
        self.segmentation.update(probs, torch.from_numpy(labels))
        if self._parts:
            cell_prob, true_cells = probs[self.cell].float().cpu().numpy(), labels == self.cell
            for part in self._parts:
                part.update(cell_prob, true_cells)

    def state(self) -> torch.Tensor:
        return torch.cat([self.segmentation.state()] + [torch.from_numpy(p.state()) for p in self._parts])

    def load_state(self, state: torch.Tensor) -> None:
        n = self.segmentation.state().numel()
        self.segmentation.load_state(state[:n])
        for part in self._parts:
            k = part.state().size
            part.load_state(state[n:n + k].numpy())
            n += k

    def compute(self) -> tuple[dict[str, float], dict | None]:
        """``(metrics, curves)``: the scalar metrics (``num_images`` last) and, with ``thinned``, the
        per-threshold curves ``{"thresholds", "v_rand", "v_info"}`` (else None)."""
        metrics = self.segmentation.compute()
        num_images = metrics.pop("num_images")
        curves = None
        if self.thinned is not None:
            thin = self.thinned.compute()
            metrics.update({k: thin[k] for k in THINNED_KEYS})
            curves = {"thresholds": list(self.thinned.thresholds), "v_rand": thin["v_rand_curve"],
                      "v_info": thin["v_info_curve"]}
        if self.instances is not None:
            metrics.update(self.instances.compute())
        metrics["num_images"] = num_images
        return metrics, curves


def evaluate_slices(model: torch.nn.Module, slices, dev: DeviceSetup, *, dist: DistInfo | None = None,
                    per_image: bool = False, options: TilingOptions | None = None, thinned: bool = False,
                    instances: InstanceOptions | None = None):
    """Metrics of a model over whole labelled slices, sharded over ranks, bit-identical to one process.

    Rank ``r`` of ``W`` predicts slices ``r, r + W, ...``. Each slice's metric state goes into its own row
    of an ``(N, S)`` float64 table that is all-reduced (adding zeros is exact) and then summed in slice
    order, so every rank returns exactly the one-process totals whatever the world size. Under torchrun
    every rank must call this.

    The challenge's thinned scores and the instance scores cost far more than the rest (docs/evaluation.md),
    so they are off unless asked: ``evaluate.py`` asks for both, training's periodic validation for neither.

    Args:
        model: the UNet (unwrapped from DDP) or :class:`~unet.prediction.ensemble.Ensemble` on ``dev.device``; its
            train/eval mode is kept.
        slices: a :class:`~unet.data.datasets.SliceSet` with labels.
        dev: the device setup.
        dist: this process's rank and world size (None: a single process).
        per_image: also return one metrics dict per slice (on every rank, in slice order).
        options: whole-slice tiling options for :func:`~unet.prediction.predictor.predict_probabilities`.
        thinned: add ``v_rand_thinned``, ``v_info_thinned`` and their thresholds (:class:`SliceScores`), and
            the per-threshold curves under ``"thinned_curves"``.
        instances: add ``v_rand_instances``, ``v_info_instances`` of instances made with these options.

    Returns:
        the metrics dict (``SegmentationMetrics.compute()``'s keys, plus those asked for); with
        ``per_image=True`` a tuple ``(metrics, rows)`` where each row has ``index``, ``name`` and that
        slice's scalar metrics.
    """
    dist = dist or DistInfo()
    if slices.labels is None:
        raise UserError(f"{slices.source}: the data has no labels; evaluation needs labels")

    def accumulator() -> SliceScores:
        return SliceScores(model.config, thinned=thinned, instances=instances)

    size = accumulator().size
    table = torch.zeros(len(slices), size, dtype=torch.float64)
    for i in range(dist.rank, len(slices), dist.world_size):
        one = accumulator()
        one.update(predict_probabilities(model, slices.images[i], dev, options), slices.labels[i])
        table[i] = one.state()
    table = all_reduce_sum(table, dev.device)
    total = accumulator()
    total.load_state(_sum_rows(table))
    metrics, curves = total.compute()
    if curves is not None:
        metrics["thinned_curves"] = curves
    if not per_image:
        return metrics
    rows = []
    for i, row in enumerate(table):
        one = accumulator()
        one.load_state(row)
        rows.append({"index": i, "name": slices.names[i], **one.compute()[0]})
    return metrics, rows


def _sum_rows(table: torch.Tensor) -> torch.Tensor:
    """The rows' sum in a fixed order (slice 0, 1, ...): float64 sums independent of the sharding."""
    state = torch.zeros(table.shape[1], dtype=torch.float64)
    for row in table:
        state += row
    return state


def cv_summary(per_fold: Sequence[dict[str, float]], keys: Sequence[str] = tuple(CV_METRICS)) -> dict:
    """Mean and sample standard deviation (ddof=1) of metrics over folds.

    Args:
        per_fold: one metrics dict per fold.
        keys: the metrics to summarise.

    Returns:
        ``{"mean": {key: float}, "std": {key: float}, "std_kind": str, "num_folds": int}`` for the keys
        that every fold has; NaN folds are left out of a metric's mean/std, and the std is NaN with fewer
        than two folds.
    """
    mean, std = {}, {}
    for key in [k for k in keys if all(k in f for f in per_fold)]:  # metrics every fold has
        values = np.array([f[key] for f in per_fold], dtype=np.float64)
        values = values[~np.isnan(values)]
        mean[key] = float(values.mean()) if values.size else math.nan
        std[key] = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return {"mean": mean, "std": std, "std_kind": STD_KIND, "num_folds": len(per_fold)}


def cv_markdown(fold_labels: Sequence[str], per_fold: Sequence[dict[str, float]], summary: dict) -> str:
    """A Markdown table: one row per fold, then ``mean ± std`` (like NVIDIA UNet_Medical's README).

    Args:
        fold_labels: the first column of each fold row.
        per_fold: one metrics dict per fold.
        summary: :func:`cv_summary` of ``per_fold``.

    Returns:
        The table as text (no trailing newline).
    """
    keys = [k for k in CV_METRICS if k in summary["mean"]]
    lines = ["| Fold | " + " | ".join(CV_METRICS[k] for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for label, m in zip(fold_labels, per_fold):
        lines.append(f"| {label} | " + " | ".join(fmt(m[k]) for k in keys) + " |")
    lines.append("| mean ± std | " + " | ".join(f"{fmt(summary['mean'][k])} ± {fmt(summary['std'][k])}"
                                                 for k in keys) + " |")
    return "\n".join(lines)


def format_table(metrics: dict[str, float]) -> str:
    """One aligned line per metric, e.g. ``dice_nvidia   0.9123``."""
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v if isinstance(v, int) else fmt(v)}" for k, v in metrics.items())


def fmt(value, spec: str = ".4f", missing: str = "nan") -> str:
    """A table cell: floats with ``spec`` (NaN as ``nan``), None as ``missing``, anything else as ``str``.

    The one number formatter of the metric tables here and of the benchmark tables (benchmarks/common.py).
    """
    if value is None:
        return missing
    if isinstance(value, (float, np.floating)):
        return format(float(value), spec)
    return str(value)


# ------------------------------------------------------------------------------------------ command line

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The ``evaluate.py`` / ``unet-evaluate`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="evaluate.py", add_help=add_help, formatter_class=HelpFormatter,
        description="Evaluate UNet checkpoints on whole slices at native resolution.\n\n"
                    "One checkpoint: metrics on its validation fold (fold, folds, scheme, seed and data\n"
                    "directory come from the checkpoint unless given here). Several checkpoints (--ckpt a b c\n"
                    "or --cv-dir): each on its own fold, plus mean ± sample std (ddof=1) over folds; with\n"
                    "--ensemble: their mean probability, scored once (they must share data and fold).\n"
                    "Metrics include the ISBI challenge's thinned V_Rand / V_Info and the cell-instance scores.\n"
                    "Runs under torchrun: slices are sharded over ranks and the metrics summed exactly.",
        epilog="examples:\n"
               "  python evaluate.py --ckpt results/fold0/best.pt --output fold0.json\n"
               "  python evaluate.py --cv-dir results/ --output cv.json\n"
               "  python evaluate.py --ckpt seed0/best.pt seed1/best.pt --ensemble --tta\n"
               "  torchrun --nproc_per_node=8 evaluate.py --ckpt best.pt --data-dir data/isbi2012")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", nargs="+", metavar="PATH", help="checkpoint(s) written by train.py")
    src.add_argument("--cv-dir", metavar="DIR",
                     help="folder of training runs: evaluates every DIR/*/best.pt (else last.pt), sorted")
    parser.add_argument("--ensemble", action="store_true",
                        help="average the probabilities of all --ckpt files and score that once (TTA applies to "
                             "each); they must have been trained on the same data and fold")
    g = parser.add_argument_group("data (default: what the checkpoint was trained with)")
    g.add_argument("--data-dir", "--data_dir", default=None,
                   help="data directory (ISBI layout or images/ + labels/); None: the checkpoint's, "
                        "else the built-in synthetic set")
    g.add_argument("--fold", type=int, default=None, help="validation fold; None: the checkpoint's")
    g.add_argument("--folds", type=int, default=None, help="number of folds; None: the checkpoint's, else 5")
    g.add_argument("--fold-scheme", "--fold_scheme", default=None, choices=SCHEMES,
                   help="fold split; None: the checkpoint's, else disjoint")
    g.add_argument("--seed", type=int, default=None, help="fold permutation seed; None: the checkpoint's, else 0")
    g.add_argument("--all-images", action="store_true", help="evaluate every slice, ignoring the fold")
    g.add_argument("--split", default="train", choices=("train", "test"),
                   help="ISBI layout: which volume (test needs test-labels.tif)")
    o = parser.add_argument_group("output")
    o.add_argument("--output", "-o", default=None, metavar="JSON",
                   help="write metrics, checkpoint, data, fold, device, tile plan and timing here (atomically)")
    o.add_argument("--per-image", action="store_true", help="also print and store metrics of every slice")
    m = parser.add_argument_group("metrics")
    m.add_argument("--no-thinned", action="store_true",
                   help="skip the ISBI challenge's V_Rand / V_Info after thinning, maximised over 11 thresholds "
                        "(about 0.5 s per 512x512 slice on a CPU core)")
    m.add_argument("--no-instances", action="store_true",
                   help="skip V_Rand / V_Info of the seeded-watershed cell instances (about 0.5 s per slice)")
    add_options(parser, DeviceOptions)
    add_options(parser, TilingOptions, skip=("memory_budget_mb",))
    add_options(parser, InstanceOptions)
    return parser


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
                        f"pass the --output-dir of your train.py runs, or list files with --ckpt")
    return found


def _resolve_run(args: argparse.Namespace, ckpt: dict) -> dict[str, Any]:
    """Data dir, fold, folds, scheme and seed: the command line where given, else the checkpoint's."""
    saved = ckpt.get("args") or {}
    if not isinstance(saved, dict):
        saved = {}

    def pick(name, default):
        given = getattr(args, name)
        if given is not None:
            return given, "command line"
        if saved.get(name) is not None:
            return saved[name], "checkpoint"
        return default, "default"

    data_dir, data_from = pick("data_dir", None)
    fold, fold_from = pick("fold", None)
    folds, _ = pick("folds", 5)
    scheme, _ = pick("fold_scheme", "disjoint")
    seed, _ = pick("seed", 0)
    if args.all_images:
        fold, fold_from = None, "--all-images"
    return {"data_dir": None if data_dir is None else str(data_dir), "data_from": data_from,
            "fold": None if fold is None else int(fold), "fold_from": fold_from, "folds": int(folds),
            "fold_scheme": str(scheme), "seed": int(seed)}


def _load_data(run: dict, ckpt_path: Path, split: str, cache: dict):
    key = (run["data_dir"], split)
    if key not in cache:
        d = run["data_dir"]
        if d is not None and run["data_from"] == "checkpoint" and not Path(d).exists():
            raise UserError(f"{d}: the data directory recorded in checkpoint {ckpt_path} does not exist here; "
                            f"pass --data-dir")
        # channels=None: the channel check below names the checkpoint, which the reader cannot.
        cache[key] = load_dataset(d, split=split, require_labels=True, channels=None)
    return cache[key]


def _data_description(run: dict, slices) -> str:
    if run["data_dir"] is None:
        h, w = slices.images[0].shape[1:]
        return (f"built-in synthetic EM data ({len(slices)} slices of {w}x{h}; no --data-dir given and "
                f"none recorded in the checkpoint)")
    return f"{run['data_dir']} ({len(slices)} slices, from the {run['data_from']})"


def _fold_description(run: dict, n_val: int) -> str:
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
    _, val = fold_indices(num_slices, run["fold"], run["folds"], run["fold_scheme"], run["seed"])
    if run["fold"] is None:
        val = list(range(num_slices))
    if not val:
        raise UserError(f"fold {run['fold']} of checkpoint {path} has no validation slices")
    return val


def _tiling_record(options: TilingOptions) -> dict[str, Any]:
    """The tiling flags as the result record states them."""
    return {"tile_size": options.tile_size, "tile_batch": options.tile_batch, "overlap": options.overlap,
            "blend": options.blend, "tta": options.tta}


def _check_same_fold(paths: list[Path], ckpts: list[dict], num_slices: int) -> None:
    """Members of an ensemble must have held out the same slices of the same data (as trained, not overridden)."""
    as_trained = argparse.Namespace(data_dir=None, fold=None, folds=None, fold_scheme=None, seed=None,
                                    all_images=False)

    def held_out(ckpt: dict) -> tuple:
        run = _resolve_run(as_trained, ckpt)
        data = None if run["data_dir"] is None else str(Path(run["data_dir"]).resolve())
        _, val = fold_indices(num_slices, run["fold"], run["folds"], run["fold_scheme"], run["seed"])
        return data or "built-in synthetic data", val

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


def evaluate_checkpoint(paths: Path | Sequence[Path], args: argparse.Namespace, dev: DeviceSetup, dist: DistInfo,
                        cache: dict | None = None, say=print) -> dict[str, Any]:
    """Evaluate one checkpoint (or an ensemble of several, their mean probability) on its fold.

    Returns:
        the JSON-able result record.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    cache = {} if cache is None else cache
    start = time.perf_counter()
    model, ckpts = load_ensemble(paths)
    run = _resolve_run(args, ckpts[0])
    slices = _load_data(run, paths[0], args.split, cache)
    if len(paths) > 1:
        _check_same_fold(paths, ckpts, len(slices))
    _check_channels(model, slices, paths[0])
    val = _validation_indices(run, len(slices), paths[0])
    subset = slices.subset(val)
    model = dev.prepare_model(model)
    options = options_from(args, TilingOptions)
    sizes = sorted({tuple(int(s) for s in im.shape[1:]) for im in subset.images})
    plans = {f"{w}x{h}": tiling_plan(model, h, w, options) for h, w in sizes}  # also checks --tile-size
    _say_header(say, paths, model, run, slices, len(val), plans, options.tta)
    inst = None if args.no_instances else options_from(args, InstanceOptions)
    result = evaluate_slices(model, subset, dev, dist=dist, per_image=args.per_image, options=options,
                             thinned=not args.no_thinned, instances=inst)
    metrics, rows = result if args.per_image else (result, None)
    curves = metrics.pop("thinned_curves", None)
    dev.synchronize()
    record = {
        "checkpoint": " + ".join(map(str, paths)),
        "data": {"source": "synthetic" if run["data_dir"] is None else run["data_dir"],
                 "from": run["data_from"], "split": args.split, "num_slices": len(slices),
                 "description": _data_description(run, slices)},
        "fold": {"fold": run["fold"], "folds": run["folds"], "scheme": run["fold_scheme"], "seed": run["seed"],
                 "from": run["fold_from"], "val_indices": val, "val_names": subset.names},
        "tiling": {**_tiling_record(options), "plans": plans},
        "metrics": metrics,
        "seconds": time.perf_counter() - start,
    }
    if len(paths) > 1:
        record["ensemble"] = [str(p) for p in paths]
    if curves is not None:
        record["thinned_curves"] = curves
    if inst is not None:
        record["instance_options"] = dataclasses.asdict(inst)
    if rows is not None:
        record["per_image"] = rows
    return record


def _checkpoint_paths(args: argparse.Namespace) -> list[Path]:
    """The checkpoints to evaluate, checked before any slow work."""
    if args.output is not None and not Path(args.output).resolve().parent.is_dir():
        raise UserError(f"--output {args.output}: folder {Path(args.output).parent} does not exist")
    paths = find_checkpoints(args.cv_dir) if args.cv_dir else [Path(p) for p in args.ckpt]
    if len(paths) > 1 and args.fold is not None and not args.ensemble:
        raise UserError("--fold cannot be combined with several checkpoints: each one is evaluated on its own "
                        "fold; drop --fold (or pass a single --ckpt, or --ensemble)")
    for p in paths:  # fail before any slow work if one file is missing
        if not p.is_file():
            raise UserError(f"checkpoint {p} does not exist; check --ckpt")
    return paths


def _cv_record(runs: list[dict], say) -> dict[str, Any]:
    """Cross-validation summary of several checkpoints' records (printed as a Markdown table)."""
    labels = [str(r["fold"]["fold"]) if r["fold"]["fold"] is not None else "all" for r in runs]
    per_fold = [r["metrics"] for r in runs]
    summary = cv_summary(per_fold)
    table = cv_markdown(labels, per_fold, summary)
    say(f"cross-validation over {len(runs)} checkpoints (± = {STD_KIND}):")
    say(table)
    folds = [r["fold"]["fold"] for r in runs]
    if len(set(folds)) != len(folds):
        say("note: several checkpoints were evaluated on the same fold")
    summary["markdown"] = table
    summary["folds"] = labels
    return summary


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``evaluate.py``: evaluate, print the table(s) on rank 0, write ``--output``.

    Args:
        args: parsed :func:`get_args_parser` arguments.

    Returns:
        The result record written to ``--output`` (the same on every rank).
    """
    start = time.perf_counter()
    dist = env_info()
    paths = _checkpoint_paths(args)
    dev = setup_device(args.device, amp=args.amp, amp_dtype=args.amp_dtype, local_rank=dist.local_rank)
    say = rank0_printer(dist)
    with process_group(dist, dev.backend, dev.device):
        say(f"device:     {dev.type} ({dev.name()}), {dev.amp_name}, {dist.world_size} process(es), "
            f"{torch.get_num_threads()} CPU thread(s) per process")
        cache: dict = {}
        runs = []
        for group in ([paths] if args.ensemble else [[p] for p in paths]):
            record = evaluate_checkpoint(group, args, dev, dist, cache, say)
            runs.append(record)
            if args.per_image and record.get("per_image"):
                for row in record["per_image"]:
                    say(f"  {row['name']}: " + "  ".join(f"{k} {fmt(row[k])}" for k in CV_METRICS if k in row))
            say(format_table(record["metrics"]))
            say(f"({record['seconds']:.1f} s)")
            say("")
        device = {"type": dev.type, "name": dev.name(), "amp": dev.amp_name, "world_size": dist.world_size}
        if len(runs) == 1:
            out = {**runs[0], "device": device, "seconds": time.perf_counter() - start}
        else:
            out = {"runs": runs, "cv": _cv_record(runs, say), "device": device,
                   "seconds": time.perf_counter() - start}
        out = jsonable(out)
        if args.output is not None and dist.is_main:
            text = json.dumps(out, indent=2) + "\n"
            atomic_write(args.output, lambda f: f.write(text.encode("utf-8")))
            say(f"wrote {args.output}")
        sys.stdout.flush()
        return out
