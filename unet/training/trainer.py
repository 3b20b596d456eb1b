"""Training: one process per device (``python train.py`` or ``torchrun --nproc_per_node=N train.py``).

Steps, not epochs: every optimizer step consumes ``batch_size`` random overlap-tile crops per rank.
Rank 0 alone prints, logs and writes; validation metrics are summed over ranks before they are read.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from unet.atomic import make_folder
from unet.training.background_save import BackgroundCheckpointer
from unet.benchmarking import PRECISION_DTYPES, measure_cpu_peak, model_flops, peak_source, time_steps
from unet.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from unet.cli.common import HelpFormatter, add_options, argparse_type, options_from
from unet.device import DeviceOptions
from unet.options import positive_int as _positive_int
from unet.prediction.tiling import TilingOptions
from unet.data.augment import AUGMENT_LEVELS, AugmentConfig
from unet.data.folds import SCHEMES, fold_indices
from unet.data.datasets import load_dataset
from unet.data.sampling import TrainTiles, build_train_loader, default_workers
from unet.device import DeviceSetup, Prefetcher, setup_device
from unet.distributed import (DistInfo, all_reduce_min, all_reduce_sum, barrier, broadcast_object, env_info,
                              process_group, rank0_printer, same_on_all_ranks)
from unet.errors import UserError
from unet.evaluation.slices import evaluate_slices
from unet.losses import ce_dice_loss, weighted_cross_entropy
from unet.training.lr_schedule import LR_SCHEDULES, learning_rate_at
from unet.model import PADDINGS, ModelConfig, UNet
from unet.run_log import MetricsLog, plot_curves, write_json
from unet.prediction.tiling import check_tile_budget
from unet.weight_map import unet_weight_map

try:  # a private torch module, used only to name inductor's cache folder in a message
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
except ImportError:  # another torch layout: the message says "torch's default" instead
    default_cache_dir = None

# Arguments that define a run: resuming with any of them changed would silently mix two experiments.
RUN_IDENTITY = ("data_dir", "fold", "folds", "fold_scheme", "seed", "batch_size", "learning_rate",
                "weight_decay", "base_filters", "depth", "padding", "batch_norm", "dropout", "input_size",
                "augment", "amp", "amp_dtype", "world_size", "clip_grad", "loss", "lr_schedule", "lr_warmup_steps",
                "augment_level")
# What a checkpoint written before a RUN_IDENTITY flag existed ran with (the flag's default then and now).
IDENTITY_DEFAULTS = {"loss": "ce_dice", "lr_schedule": "constant", "lr_warmup_steps": 0, "augment_level": "full"}
# --loss: NVIDIA UNet_Medical's CE + soft Dice, or the UNet paper's weighted cross-entropy (eq. 1-2).
LOSSES = ("ce_dice", "weighted_ce")
# The UNet paper's border weight and width (Ronneberger et al. 2015, eq. 2).
WEIGHT_MAP_W0, WEIGHT_MAP_SIGMA = 10.0, 5.0
positive_int = argparse_type(_positive_int)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Under fp16 the scaler skips overflowing steps itself; only this many non-finite losses in a row are fatal.
MAX_NONFINITE_STREAK_FP16 = 20


class TrainingDiverged(UserError):
    """The loss became non-finite; the last good checkpoint is kept."""


def _add_optimisation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", "--batch_size", type=positive_int, default=8, help="crops per step per device")
    g.add_argument("--learning-rate", "--learning_rate", type=float, default=1e-4,
                   help="Adam learning rate (the peak, with a warm-up or a decaying --lr-schedule)")
    g.add_argument("--lr-schedule", "--lr_schedule", default="constant", choices=LR_SCHEDULES,
                   help="constant (UNet_Medical); cosine or poly (nnU-Net's (1 - t)^0.9) decay to 0 at --max-steps")
    g.add_argument("--lr-warmup-steps", "--lr_warmup_steps", type=int, default=0,
                   help="linear learning-rate warm-up over the first N steps")
    g.add_argument("--weight-decay", "--weight_decay", type=float, default=5e-4,
                   help="L2 weight decay, applied (UNet_Medical's TF1 code never applied its own)")
    g.add_argument("--max-steps", "--max_steps", type=positive_int, default=6400, help="optimizer steps in total")
    g.add_argument("--clip-grad", "--clip_grad", type=float, default=None, help="clip the gradient norm to this")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, data stream and dropout")
    g.add_argument("--loss", default="ce_dice", choices=LOSSES,
                   help="ce_dice: cross-entropy + (1 - soft Dice) as UNet_Medical; weighted_ce: the UNet paper's "
                        f"pixel-weighted cross-entropy (class balance + border term, w0={WEIGHT_MAP_W0:g}, "
                        f"sigma={WEIGHT_MAP_SIGMA:g} px)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile forward + loss as one function; default (None): on for CUDA, off on CPU "
                        "(measured slower there) and NPU (not measured there)")
    g.add_argument("--compile-mode", "--compile_mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode when compiling (torch's default; the GPU check measures the others)")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=HelpFormatter, add_help=add_help,
        description="Train a UNet on EM slices (ISBI 2012 layout, images/+labels/ folders, or the built-in "
                    "synthetic set).\nOne device: python train.py ...   Many: torchrun --nproc_per_node=8 "
                    "train.py ...")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", "--data_dir", default=None,
                   help="ISBI 2012 folder (train-volume.tif + train-labels.tif) or images/ + labels/ folders; "
                        "omitted: the built-in synthetic EM set")
    g.add_argument("--fold", type=int, default=None, help="validation fold; omitted: train on all images")
    g.add_argument("--folds", type=positive_int, default=5, help="number of cross-validation folds")
    g.add_argument("--fold-scheme", "--fold_scheme", default="disjoint", choices=SCHEMES,
                   help="disjoint: every image validated exactly once; nvidia: UNet_Medical's overlapping folds")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="flips, rotations, elastic deformation, intensity changes")
    g.add_argument("--augment-level", "--augment_level", default="full", choices=AUGMENT_LEVELS,
                   help="with --augment: full (flips, free rotation, elastic, grey values), geometric (no grey-value "
                        "changes) or flips (flips and quarter turns only)")
    g.add_argument("--workers", type=int, default=None, help="data loader processes per rank (default: from CPUs)")
    g = p.add_argument_group("model")
    g.add_argument("--base-filters", "--base_filters", type=int, default=64, help="filters of the first level")
    g.add_argument("--depth", type=int, default=5, help="levels including the bottleneck")
    g.add_argument("--padding", default="valid", choices=PADDINGS,
                   help="valid: unpadded convolutions as in UNet_Medical; same: output size = input size")
    g.add_argument("--batch-norm", "--batch_norm", action=argparse.BooleanOptionalAction, default=False,
                   help="BatchNorm after each 3x3 conv")
    g.add_argument("--dropout", type=float, default=0.5, help="dropout after the bottleneck (training only)")
    g.add_argument("--input-size", "--input_size", type=int, default=None,
                   help="training crop size fed to the model (default: 572 for valid, 256 for same)")
    _add_optimisation_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--model-dir", "--model_dir", default="results", help="checkpoints, logs and curves go here")
    g.add_argument("--evaluate-every", "--evaluate_every", type=int, default=0,
                   help="validate every N steps (0: only at the end)")
    g.add_argument("--log-every", "--log_every", type=positive_int, default=20, help="log the loss every N steps")
    g.add_argument("--save-every", "--save_every", type=positive_int, default=200, help="write last.pt every N steps")
    g.add_argument("--resume", action="store_true",
                   help="require resuming from MODEL_DIR/last.pt (a matching run there is resumed anyway)")
    g.add_argument("--overwrite", action="store_true", help="start over even if MODEL_DIR holds a run")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", action="store_true",
                   help="time --max-steps steps after --warmup-steps; no checkpoints, no validation")
    g.add_argument("--warmup-steps", "--warmup_steps", type=int, default=10,
                   help="untimed steps before timing in --benchmark mode")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak (TFLOP/s) for MFU; default: known accelerators, measured matmul peak on CPU")
    add_options(p, DeviceOptions)
    add_options(p, TilingOptions, skip=("memory_budget_mb",))
    return p


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run: the parsed flags, resolved once, plus the world size.

    Built by :meth:`from_args` and never edited afterwards; stored in every checkpoint under ``"args"`` as a
    plain dict (:meth:`as_dict`, the same keys as the ``vars(args)`` of earlier versions, which still load).
    """

    data_dir: str | None
    fold: int | None
    folds: int
    fold_scheme: str
    augment: bool
    workers: int | None
    base_filters: int
    depth: int
    padding: str
    batch_norm: bool
    dropout: float
    input_size: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    max_steps: int
    clip_grad: float | None
    seed: int
    compile: bool
    model_dir: str
    evaluate_every: int
    log_every: int
    save_every: int
    resume: bool
    overwrite: bool
    no_progress: bool
    benchmark: bool
    warmup_steps: int
    peak_tflops: float | None
    device: str
    amp: bool
    amp_dtype: str | None  # the dtype autocast really uses (bf16/fp16), None without --amp
    tile_size: int | None
    tile_batch: int
    overlap: float
    blend: str
    tta: bool
    world_size: int = 1
    loss: str = "ce_dice"
    compile_mode: str = "default"
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    augment_level: str = "full"

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, world_size: int, amp_dtype: str | None,
                  compile_default: bool = False) -> "RunConfig":
        """The run's config from :func:`get_args_parser` arguments (the default crop size filled in, and
        ``compile`` resolved: ``--compile`` / ``--no-compile``, else ``compile_default``, the device's choice)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "world_size"}
        if values["input_size"] is None:
            values["input_size"] = 572 if args.padding == "valid" else 256
        if values["compile"] is None:
            values["compile"] = compile_default
        return cls(**{**values, "amp_dtype": amp_dtype, "world_size": world_size})

    def as_dict(self) -> dict:
        """A plain dict (what checkpoints store under ``"args"``: ``weights_only`` loads no dataclasses)."""
        return asdict(self)

    def identity(self) -> dict:
        """The :data:`RUN_IDENTITY` values."""
        return {k: getattr(self, k) for k in RUN_IDENTITY}


def _check_args(args: argparse.Namespace) -> None:
    if args.evaluate_every < 0:
        raise UserError(f"--evaluate-every must be 0 or more, got {args.evaluate_every}")
    if args.benchmark and args.warmup_steps < 0:
        raise UserError(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    if args.lr_warmup_steps < 0 or (not args.benchmark and args.lr_warmup_steps >= args.max_steps):
        raise UserError(f"--lr-warmup-steps must be 0 or more and below --max-steps {args.max_steps}, "
                        f"got {args.lr_warmup_steps}")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")


def forward_loss_fn(net: torch.nn.Module, dev: DeviceSetup, loss: str = "ce_dice"):
    """Autocast forward + float32 loss as one function of a device batch: what ``--compile`` compiles whole.

    Args:
        net: the model (or its DDP / compiled wrapper).
        dev: the device setup (autocast).
        loss: one of :data:`LOSSES`; ``weighted_ce`` takes the batch's weight maps as a third argument.

    Returns:
        ``forward_loss(images, labels, weights=None) -> scalar float32 loss``.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")

    def forward_loss(images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None):
        with dev.autocast():
            logits = net(images)
        if loss == "weighted_ce":
            return weighted_cross_entropy(logits, labels, weights)
        return ce_dice_loss(logits, labels)
    return forward_loss


def train_step(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler, dev: DeviceSetup, clip_grad: float | None = None) -> torch.Tensor:
    """One eager CE + soft Dice optimizer step on a host or device batch (the benchmarks' step); returns the
    detached loss, left on the device. The trainer runs :func:`optimizer_step` on prefetched batches."""
    return optimizer_step(forward_loss_fn(net, dev), (dev.to_device(images), dev.to_device(labels)), optimizer,
                          scaler, clip_grad)


def optimizer_step(forward_loss, batch: tuple[torch.Tensor, ...], optimizer: torch.optim.Optimizer, scaler,
                   clip_grad: float | None = None) -> torch.Tensor:
    """One optimizer step on a batch already on the device; returns the (detached) loss, left on the device.

    ``forward_loss(*batch)`` (autocast forward + float32 loss, compiled or not), then scale -> backward ->
    unscale -> optional clip -> step -> update (the scaler is a no-op unless fp16). A step whose gradients
    overflowed is skipped by the scaler. Nothing here reads a value back to the host.
    """
    loss = forward_loss(*batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def _weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all weights: equal on every rank exactly when DDP kept the replicas in sync."""
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def find_run(config: RunConfig, model_dir: Path) -> dict | None:
    """The checkpoint to resume from, None to start fresh; refuses to clobber a different run."""
    last = model_dir / "last.pt"
    if config.overwrite:
        return None
    if not last.exists():
        if config.resume:
            raise UserError(f"--resume: there is no {last} to resume from; drop --resume to start a new run")
        return None
    ckpt = load_checkpoint(last)
    saved = {k: ckpt.get("args", {}).get(k, IDENTITY_DEFAULTS.get(k)) for k in RUN_IDENTITY}
    diff = [f"--{k.replace('_', '-')} {saved[k]!r} there vs {v!r} now" for k, v in config.identity().items()
            if saved[k] != v]
    if diff:
        raise UserError(f"{model_dir} holds a different run ({'; '.join(diff[:3])}); pass the same arguments to "
                        f"resume it, --overwrite to start over, or another --model-dir")
    return ckpt


class LossTracker:
    """Loss bookkeeping kept on the device (no host sync per step).

    Sums the finite losses since the last log (steps the fp16 scaler skipped are left out) and remembers the
    first step at which the non-finite losses in a row reached the limit (1, or
    :data:`MAX_NONFINITE_STREAK_FP16` under fp16, whose scaler skips overflowing steps itself).
    """

    def __init__(self, device: torch.device, fp16: bool):
        self.device, self.fp16 = device, fp16
        self.limit = MAX_NONFINITE_STREAK_FP16 if fp16 else 1
        self.streak = torch.zeros((), device=device)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self.loss_sum, self.finite_count = torch.zeros((), device=device), torch.zeros((), device=device)
        self.count, self.since = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(loss)
        self.streak = torch.where(finite, torch.zeros_like(self.streak), self.streak + 1)
        self.first_bad = torch.where((self.first_bad < 0) & (self.streak >= self.limit),
                                     torch.full_like(self.first_bad, step), self.first_bad)
        self.loss_sum += torch.where(finite, loss, torch.zeros_like(self.loss_sum))
        self.finite_count += finite
        self.count += 1

    def first_bad_step(self, max_steps: int) -> int | None:
        """The earliest bad step on any rank (an all-reduce), or None."""
        never = torch.full_like(self.first_bad, max_steps + 1)  # ranks without a bad step
        bad = int(all_reduce_min(torch.where(self.first_bad < 0, never, self.first_bad), self.device).item())
        return bad if bad <= max_steps else None

    def mean_and_reset(self) -> tuple[float, int, float]:
        """(mean finite loss over all ranks, steps, seconds) since the last call; NaN if every step was skipped."""
        total = all_reduce_sum(torch.stack([self.loss_sum, self.finite_count]), self.device)
        mean_loss = (total[0] / total[1]).item()
        steps, seconds = self.count, time.perf_counter() - self.since
        self.loss_sum.zero_()
        self.finite_count.zero_()
        self.count = 0
        self.restart_clock()
        return mean_loss, steps, seconds

    def restart_clock(self) -> None:
        """Start timing throughput afresh (validation time is not training throughput)."""
        self.since = time.perf_counter()


def main(args: argparse.Namespace) -> dict:
    """Train (or benchmark) as ``args`` say; returns the final summary (on every rank)."""
    _check_args(args)
    dist = env_info()
    dev = setup_device(args.device, amp=args.amp, amp_dtype=args.amp_dtype, local_rank=dist.local_rank)
    config = RunConfig.from_args(args, world_size=dist.world_size, amp_dtype=dev.amp_name if args.amp else None,
                                 compile_default=dev.compile_by_default)
    with process_group(dist, dev.backend, dev.device):
        return Trainer(config, dist, dev).fit()


class Trainer:
    """One training run on this rank; :meth:`fit` reads as its outline.

    Args:
        config: the run's :class:`RunConfig`.
        dist: this process's place in the job.
        dev: the device setup.
    """

    def __init__(self, config: RunConfig, dist: DistInfo, dev: DeviceSetup):
        self.config, self.dist, self.dev = config, dist, dev
        self.model_dir = Path(config.model_dir)
        self.data_name = config.data_dir or "built-in synthetic EM set"
        self.say = rank0_printer(dist)
        self.tiling = options_from(config, TilingOptions)
        self.global_batch = config.batch_size * dist.world_size
        self.step = 0
        self.last_good_step: int | None = None  # None: this run has written or resumed no last.pt
        self.best_dice_nvidia, self.best_step = -math.inf, None
        self.last_metrics: dict | None = None
        self.log: MetricsLog | None = None
        self.saver: BackgroundCheckpointer | None = None  # rank 0's checkpoint writer, while training
        self.train_weights: list | None = None  # --loss weighted_ce: one weight map per training slice
        self.first_step_s: float | None = None

    def fit(self) -> dict:
        """restore -> loop of train steps -> validate -> save; returns the summary (or the benchmark result)."""
        self.load_data()
        model = self.new_model()
        resume = self.restore()
        if resume is not None and int(resume["step"]) >= self.config.max_steps:
            return self.already_done(resume)
        self.build(model, resume)
        self.announce(resumed=resume is not None)
        if self.config.benchmark:
            return run_benchmark(self)
        with self.background_saves():
            self.train(resumed=resume is not None)
            return self.finish()

    def train(self, resumed: bool) -> None:
        """The loop: a step, then the log / validation / checkpoint due after it, until ``max_steps``."""
        if self.dist.is_main:
            self.log = MetricsLog(self.model_dir / "metrics.jsonl", resume_step=self.step if resumed else None)
        losses = LossTracker(self.dev.device, fp16=self.scaler.is_enabled())
        bar = tqdm(total=self.config.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not self.dist.is_main or self.config.no_progress, smoothing=0.1)
        self.model.train()
        self.last_good_step = self.step if resumed else None
        first_step = self.step + 1
        started = time.perf_counter()
        while self.step < self.config.max_steps:
            loss = self.train_one()
            self.step += 1
            if self.step == first_step:
                self.report_first_step(started)
            losses.add(loss, self.step)
            bar.update(1)
            self.after_step(losses, bar)
        bar.close()

    def train_one(self) -> torch.Tensor:
        """One optimizer step on the next prefetched batch; the loss stays on the device."""
        self.set_learning_rate(self.step + 1)
        if self.config.compile and self.config.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # CUDA-graph trees: last step's outputs may be reused
        return optimizer_step(self.forward_loss, next(self.batches), self.optimizer, self.scaler,
                              self.config.clip_grad)

    def set_learning_rate(self, step: int) -> None:
        """The schedule's rate for ``step`` into every param group (a function of the step alone: resumable)."""
        c = self.config
        self.lr = learning_rate_at(step, peak=c.learning_rate, max_steps=c.max_steps, schedule=c.lr_schedule,
                                   warmup_steps=c.lr_warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def report_first_step(self, started: float) -> None:
        """The first step's time (it holds torch.compile's compilation): one device sync, printed by rank 0."""
        self.dev.synchronize()
        self.first_step_s = time.perf_counter() - started
        if self.config.compile:
            self.say(f"compile: first step {self.first_step_s:.1f} s (torch.compile, mode {self.config.compile_mode}; "
                     f"kernels cached across runs in {inductor_cache_dir()})")

    @contextlib.contextmanager
    def background_saves(self):
        """Rank 0 writes checkpoints on a background thread while this block runs.

        Leaving the block, normally or by an exception (divergence, Ctrl-C), waits for the last write, so the
        checkpoint the messages name is on disk; a failed write is raised (or noted on the exception already
        propagating). A SIGKILL mid-write leaves the previous file (the writes are atomic).
        """
        if not self.dist.is_main:
            yield
            return
        try:
            with BackgroundCheckpointer() as self.saver:
                yield
        finally:
            self.saver = None

    # -------------------------------------------------------------------------------------- set-up

    def load_data(self) -> None:
        c = self.config
        slices = load_dataset(c.data_dir)
        train_idx, val_idx = fold_indices(len(slices), c.fold, c.folds, c.fold_scheme, c.seed)
        self.train_set, self.val_set = slices.subset(train_idx), slices.subset(val_idx)
        if c.loss == "weighted_ce":
            self.train_weights = self.weight_maps()

    def weight_maps(self) -> list:
        """The UNet paper's weight map of every training label, computed once (every rank computes its own:
        ~0.12 s a 512x512 ISBI slice, cheaper than shipping them; slices may differ in size, hence per slice)."""
        t0 = time.perf_counter()
        maps = [unet_weight_map(lab, WEIGHT_MAP_W0, WEIGHT_MAP_SIGMA) for lab in self.train_set.labels]
        self.say(f"loss weighted_ce: weight maps of {len(maps)} training slices (w0 {WEIGHT_MAP_W0:g}, sigma "
                 f"{WEIGHT_MAP_SIGMA:g} px) in {time.perf_counter() - t0:.1f} s")
        return maps

    def new_model(self) -> UNet:
        """Freshly initialised weights, the same on every rank (DDP also broadcasts them)."""
        c = self.config
        self.model_config = ModelConfig(in_channels=self.train_set.images[0].shape[0], base_filters=c.base_filters,
                                        depth=c.depth, padding=c.padding, batch_norm=c.batch_norm, dropout=c.dropout)
        torch.manual_seed(c.seed)
        model = UNet(self.model_config)
        try:
            self.output_size = model.output_size(c.input_size)
        except ValueError as e:
            raise UserError(f"--input-size: {e}") from None
        if c.tile_size is not None:  # refused now, not at the first validation after minutes of training
            check_tile_budget(model, c.tile_size, self.tiling.memory_budget_mb)
        return model

    def restore(self) -> dict | None:
        """The checkpoint to resume from (None: a fresh run); every rank agrees before touching the model."""
        resume = None
        if self.dist.is_main and not self.config.benchmark:
            make_folder(self.model_dir, "--model-dir")
            resume = find_run(self.config, self.model_dir)
        resume_step = broadcast_object(resume["step"] if resume is not None else None)
        if resume_step is not None and resume is None:
            resume = load_checkpoint(self.model_dir / "last.pt")
        return resume

    def already_done(self, resume: dict) -> dict:
        self.say(f"{self.model_dir} holds a finished run ({resume['step']} steps); nothing to do. Raise "
                 f"--max-steps to train on, or pass --overwrite to start over")
        return resume.get("summary") or {"steps": int(resume["step"]), "model_dir": str(self.model_dir)}

    def build(self, model: UNet, resume: dict | None) -> None:
        """Model, optimizer, scaler, DDP/compile wrapper and data stream, from ``resume`` where given."""
        c = self.config
        if resume is not None:
            model = model_from_checkpoint(resume, self.model_dir / "last.pt")
        self.model = self.dev.prepare_model(model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay,
                                          **self.dev.optimizer_kwargs())
        self.scaler = self.dev.grad_scaler()
        if resume is not None:
            self.load_state(resume)
        self.forward_loss = self.compiled_step()
        self.workers = default_workers() if c.workers is None else c.workers
        augment = AugmentConfig.level(c.augment_level) if c.augment else False
        stream = TrainTiles(self.train_set, c.input_size, self.output_size, augment=augment, seed=c.seed,
                            rank=self.dist.rank, world_size=self.dist.world_size,
                            start_index=self.step * c.batch_size, weights=self.train_weights)
        # Starting the loader draws from torch's generator, so the dropout stream is set after it.
        loader = build_train_loader(stream, c.batch_size, self.workers, self.dev.pin_memory)
        self.batches = Prefetcher(iter(loader), self.dev)
        if resume is not None:
            self.dev.set_rng_state(resume["rng"])
        else:
            torch.manual_seed(c.seed + 1)  # dropout stream, independent of how many weights were drawn

    def compiled_step(self):
        """``forward_loss`` of the (DDP-wrapped) model; with ``--compile``, compiled as one function.

        One process: model + loss are one compiled graph (as ``benchmarks/gpu_rows.py``'s compiled step).
        Under DDP the wrapped model is compiled (torch's documented DDP path, whose graph breaks at the gradient
        buckets) and the loss stays eager: compiling a function around a DDP module is not tested here.
        """
        c = self.config
        self.net = self.model
        if self.dist.distributed:
            self.net = DistributedDataParallel(self.model, **self.dev.ddp_kwargs())
            if c.compile:
                self.net = torch.compile(self.net, mode=c.compile_mode)
        forward_loss = forward_loss_fn(self.net, self.dev, c.loss)
        if c.compile and not self.dist.distributed:
            forward_loss = torch.compile(forward_loss, mode=c.compile_mode)
        return forward_loss

    def load_state(self, resume: dict) -> None:
        """Optimizer, scaler, step and best score of a checkpoint (``best_dice`` in older ones)."""
        self.optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):
            self.scaler.load_state_dict(resume["scaler"])
        self.step = int(resume["step"])
        self.best_dice_nvidia = resume.get("best_dice_nvidia", resume.get("best_dice", -math.inf))
        self.best_step = resume.get("best_step")

    def announce(self, resumed: bool) -> None:
        c, cfg, ws = self.config, self.model_config, self.dist.world_size
        self.say(f"unet-train: {self.dev.name()} ({self.dev.type}, {self.dev.amp_name}) x {ws} process(es); "
                 f"global batch {self.global_batch} = {c.batch_size} per device x {ws}")
        self.say(f"data: {self.data_name}: {len(self.train_set)} training / {len(self.val_set)} validation "
                 f"slices (fold {c.fold} of {c.folds}, {c.fold_scheme}); crops {c.input_size} -> "
                 f"{self.output_size}, augment {c.augment_level if c.augment else 'off'}, {self.workers} loader worker(s)")
        self.say(f"model: {sum(p.numel() for p in self.model.parameters()):,} parameters, {cfg.padding} padding, "
                 f"base {cfg.base_filters} filters, depth {cfg.depth}; loss {c.loss}; step "
                 + (f"compiled (mode {c.compile_mode})" if c.compile else "eager")
                 + f"; Adam {'fused' if self.dev.optimizer_kwargs().get('fused') else 'default'}, learning rate "
                 + f"{c.learning_rate:g} {c.lr_schedule}"
                 + (f" after {c.lr_warmup_steps} warm-up steps" if c.lr_warmup_steps else ""))
        if resumed:
            self.say(f"resuming {self.model_dir / 'last.pt'} at step {self.step}")

    # -------------------------------------------------------------------------------------- the loop

    def after_step(self, losses: LossTracker, bar) -> None:
        """Divergence check, loss log, validation and checkpoint, each when due."""
        c, step = self.config, self.step
        at_end = step == c.max_steps
        do_log = step % c.log_every == 0 or at_end
        do_eval = (c.evaluate_every and step % c.evaluate_every == 0) or at_end
        do_save = step % c.save_every == 0 or at_end
        if do_log or do_eval or do_save:
            self.check_finite(losses)
        if do_log:
            self.log_loss(losses, bar)
        if do_eval:
            self.last_metrics = self.validate() or self.last_metrics
            losses.restart_clock()
        if do_save and not at_end:
            self.save("last.pt", self.last_metrics)
            self.last_good_step = step

    def kept_checkpoint(self) -> str:
        """What a stopped run leaves to resume from, naming last.pt only when this run wrote or resumed it."""
        if self.last_good_step is None:
            return "no checkpoint was written"
        return f"keeping the last good checkpoint {self.model_dir / 'last.pt'} (step {self.last_good_step})"

    def check_finite(self, losses: LossTracker) -> None:
        bad = losses.first_bad_step(self.config.max_steps)
        if bad is not None:
            raise TrainingDiverged(
                f"the loss became non-finite at step {bad}"
                f"{f' ({MAX_NONFINITE_STREAK_FP16} steps in a row, beyond what fp16 loss scaling skips)' if losses.fp16 else ''}; "
                f"stopped, {self.kept_checkpoint()}; "
                f"try a lower --learning-rate, --clip-grad 1.0 or --amp-dtype bf16")

    def log_loss(self, losses: LossTracker, bar) -> None:
        mean_loss, steps, seconds = losses.mean_and_reset()  # NaN (logged as null) if the scaler skipped all
        ips = steps * self.global_batch / seconds
        if self.log:
            self.log.write({"kind": "train", "step": self.step, "loss": mean_loss, "lr": self.lr,
                            "images_per_s": ips, "loss_scale": self.scaler.get_scale() if losses.fp16 else None})
        bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.1f}")

    def validate(self) -> dict | None:
        """Whole-slice metrics on the validation fold (all ranks); a new best score writes best.pt."""
        if not len(self.val_set):
            return None
        # evaluate_slices runs the model in eval mode (no dropout) and restores training mode after.
        metrics = evaluate_slices(self.model, self.val_set, self.dev, dist=self.dist, options=self.tiling)
        if self.log:
            self.log.write({"kind": "val", "step": self.step, "val": metrics})
        self.say(f"step {self.step}: validation " + ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k in ("dice_nvidia", "dice_mean", "iou_mean", "v_rand",
                                                                "v_info")))
        if metrics["dice_nvidia"] > self.best_dice_nvidia:
            self.best_dice_nvidia, self.best_step = metrics["dice_nvidia"], self.step
            self.save("best.pt", metrics)
        return metrics

    def save(self, name: str, metrics: dict | None = None, summary: dict | None = None) -> None:
        """Rank 0 writes ``model_dir/name`` (in the background while training); every rank waits for the request."""
        if self.dist.is_main:
            state = dict(step=self.step, optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                         rng=self.dev.rng_state(), args=self.config.as_dict(), metrics=metrics or {},
                         best_dice_nvidia=self.best_dice_nvidia, best_step=self.best_step, summary=summary)
            if self.saver is not None:  # a host snapshot now, the file written on the saver's thread
                self.saver.save(self.model_dir / name, self.model, **state)
            else:
                save_checkpoint(self.model_dir / name, self.model, **state)
        barrier()

    def finish(self) -> dict:
        """Final last.pt, summary.json and curves.png; returns the summary."""
        c, best = self.config, self.best_dice_nvidia
        summary = {"weights_identical_across_ranks": same_on_all_ranks(_weights_digest(self.model)),
                   "steps": self.step, "global_batch": self.global_batch, "world_size": self.dist.world_size,
                   "device": self.dev.name(), "amp": self.dev.amp_name,
                   "best_dice_nvidia": best if best > -math.inf else None, "best_step": self.best_step,
                   "final_validation": self.last_metrics, "model_dir": str(self.model_dir), "fold": c.fold,
                   "fold_scheme": c.fold_scheme, "data": str(self.data_name), "loss": c.loss,
                   "compile": c.compile, "compile_mode": c.compile_mode if c.compile else None,
                   "first_step_s": self.first_step_s}
        self.save("last.pt", self.last_metrics, summary=summary)
        if self.saver is not None:
            self.saver.flush()  # last.pt is on disk before summary.json says the run is done
        if self.dist.is_main:
            write_json(self.model_dir / "summary.json", summary)
            plot_curves(self.log.read(), self.model_dir / "curves.png",
                        title=f"fold {c.fold} ({c.fold_scheme}), {self.data_name}")
            self.say(f"done: {self.step} steps; best dice_nvidia {summary['best_dice_nvidia']} at step "
                     f"{self.best_step}; files in {self.model_dir}")
        return summary


def inductor_cache_dir() -> str:
    """Where torch.compile keeps compiled kernels between runs: ``$TORCHINDUCTOR_CACHE_DIR``, else torch's
    default (``/tmp/torchinductor_<user>``), so a second run of the same model and shapes compiles little."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or (default_cache_dir() if default_cache_dir
                                                         else "torch's default inductor cache folder")


def run_benchmark(trainer: Trainer) -> dict:
    """Time ``max_steps`` training steps after ``warmup_steps``, device synchronised; writes benchmark.json.

    The first step is timed on its own (``first_step_s``: torch.compile's compilation when compiling) and
    counts as the first warm-up step.
    """
    c, dev, model = trainer.config, trainer.dev, trainer.model
    flops_per_image = model_flops(model, (1, model.config.in_channels, c.input_size, c.input_size))
    model.train()
    started = time.perf_counter()
    trainer.train_one()
    trainer.report_first_step(started)
    _, step_time = time_steps(trainer.train_one, max(c.warmup_steps - 1, 0), c.max_steps, dev, barrier=barrier)
    peak_memory = dev.peak_memory_bytes()  # read before the CPU peak measurement adds its own buffers
    achieved = flops_per_image * c.batch_size / step_time  # per device
    precision = dev.amp_name
    cpu_peaks = ({precision: measure_cpu_peak(PRECISION_DTYPES[precision])}
                 if dev.type == "cpu" and not c.peak_tflops else {})
    peak, source = peak_source(dev, precision, cpu_peaks, c.peak_tflops)
    result = {"images_per_s": trainer.global_batch / step_time, "step_time_ms": step_time * 1e3,
              "global_batch": trainer.global_batch, "world_size": trainer.dist.world_size,
              "batch_per_device": c.batch_size, "input_size": c.input_size, "amp": dev.amp_name,
              "compile": c.compile, "compile_mode": c.compile_mode if c.compile else None,
              "first_step_s": trainer.first_step_s, "loss": c.loss, "device": dev.name(), "peak_memory_mb": peak_memory / 2 ** 20,
              "gflop_per_image": flops_per_image / 1e9, "achieved_tflops_per_device": achieved / 1e12,
              "peak_tflops": peak / 1e12 if peak else None, "peak_source": source,
              "mfu": achieved / peak if peak else None, "steps": c.max_steps, "warmup_steps": c.warmup_steps}
    trainer.say("benchmark: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in result.items()))
    if trainer.dist.is_main:
        make_folder(trainer.model_dir, "--model-dir")
        write_json(trainer.model_dir / "benchmark.json", result)
    return result

