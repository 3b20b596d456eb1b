"""Training: one process per device (``python train.py`` or ``torchrun --nproc_per_node=N train.py``).

Steps, not epochs: every optimizer step consumes ``batch_size`` random overlap-tile crops per rank.
Rank 0 alone prints, logs and writes; validation metrics are summed over ranks before they are read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from unet.data.augment import AugmentConfig
from unet.data.own_data import load_split
from unet.data.sampling import TrainTiles, build_train_loader, default_workers
from unet.device import DeviceSetup, Prefetcher, setup_device
from unet.distributed import (DistInfo, all_reduce_min, all_reduce_sum, broadcast_object, env_info, process_group,
                              rank0_printer, same_on_all_ranks)
from unet.errors import UserError
from unet.evaluation.slices import evaluate_slices
from unet.host_memory import keep_freed_memory
from unet.losses import ce_dice_loss, weighted_cross_entropy
from unet.model import ModelConfig, UNet
from unet.prediction.tiling import check_tile_budget
from unet.run_log import MetricsLog, plot_curves, write_json
from unet.training import narration, resume as checkpoints
from unet.training.background_save import BackgroundCheckpointer
from unet.training.benchmark import run_benchmark
from unet.training.config import LOSSES, WEIGHT_MAP_SIGMA, WEIGHT_MAP_W0, RunConfig, check_config
from unet.training.init_from import apply_init, encoder_frozen, parameter_groups, read_init
from unet.training.layout import MEMORY_FORMATS, choose_layout
from unet.training.lr_schedule import learning_rate_at
from unet.training.tensorboard import TensorBoardLog, open_tensorboard, validation_pictures
from unet.checkpoint import model_from_checkpoint
from unet.weight_map import unet_weight_map

# Under fp16 the scaler skips overflowing steps itself; only this many non-finite losses in a row are fatal.
MAX_NONFINITE_STREAK_FP16 = 20


class TrainingDiverged(UserError):
    """The loss became non-finite; the last good checkpoint is kept."""


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


def run_training(config: RunConfig) -> dict:
    """Train (or benchmark) as ``config`` says: the library's entry, taking no command-line arguments.

    Args:
        config: the run's settings as given (derived values are filled in here, once the device is known).

    Returns:
        The final summary (on every rank), or the benchmark result.
    """
    check_config(config)
    dist = env_info()
    dev_opts = config.device_options
    dev = setup_device(dev_opts.device, amp=dev_opts.amp, amp_dtype=dev_opts.amp_dtype, local_rank=dist.local_rank)
    config = config.resolved(world_size=dist.world_size, amp_dtype=dev.amp_name if dev_opts.amp else None,
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
        self.data_name = config.data.train_images or config.data.data_dir or "built-in synthetic EM set"
        self.init: dict | None = None  # --init-from: what the weights started from (path, sha256, ...)
        self.say = rank0_printer(dist)
        self.tiling = config.tiling
        self.global_batch = config.batch_size * dist.world_size
        self.step = 0
        self.last_good_step: int | None = None  # None: this run has written or resumed no last.pt
        self.best_dice_nvidia, self.best_step = -math.inf, None
        self.last_metrics: dict | None = None
        self.log: MetricsLog | None = None
        self.board: TensorBoardLog | None = None
        self.saver: BackgroundCheckpointer | None = None  # rank 0's checkpoint writer, while training
        self.train_weights: list | None = None  # --loss weighted_ce: one weight map per training slice
        self.first_step_s: float | None = None
        # Before the model and the data allocate anything large (unet.host_memory says why).
        self.allocator_line = (keep_freed_memory() if dev.type == "cpu" and config.host_allocator == "auto"
                               else None)

    def fit(self) -> dict:
        """restore -> loop of train steps -> validate -> save; returns the summary (or the benchmark result)."""
        self.load_data()
        model = self.new_model()
        resume = checkpoints.restore(self.config, self.dist, self.model_dir)
        if resume is not None and int(resume["step"]) >= self.config.max_steps:
            return self.already_done(resume)
        self.build(model, resume)
        self.announce(resumed=resume is not None)
        if self.config.benchmark:
            return run_benchmark(self.config, self.model, self.dev, self.dist, self.train_one,
                                 self.report_first_step, self.say)
        with self.background_saves():
            self.train(resumed=resume is not None)
            return self.finish()

    def train(self, resumed: bool) -> None:
        """The loop: a step, then the log / validation / checkpoint due after it, until ``max_steps``."""
        if self.dist.is_main:
            self.log = MetricsLog(self.model_dir / "metrics.jsonl", resume_step=self.step if resumed else None)
            self.board = self.open_board(resumed)  # after the log: a read-only folder is refused by the log first
            self.log.mirror = self.board.record if self.board else None
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
        """The schedule's rate for ``step`` into every param group, 0 for a frozen encoder's (a function of the
        step alone: resumable)."""
        c = self.config
        self.lr = learning_rate_at(step, peak=c.learning_rate, max_steps=c.max_steps, schedule=c.lr_schedule,
                                   warmup_steps=c.lr_warmup_steps)
        frozen = encoder_frozen(step, c.freeze_encoder_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0 if frozen and group.get("encoder") else self.lr

    def report_first_step(self, started: float) -> float:
        """The first step's time (it holds torch.compile's compilation): one device sync, printed by rank 0."""
        self.dev.synchronize()
        self.first_step_s = time.perf_counter() - started
        if self.config.compile:
            self.say(narration.compile_line(self.first_step_s, self.config.compile_mode))
        return self.first_step_s

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
        split = load_split(c.data, c.labels, c.volume)
        self.train_set, self.val_set, self.held_out = split.train, split.val, split.held_out
        if c.loss == "weighted_ce":
            self.train_weights = self.weight_maps()

    def weight_maps(self) -> list:
        """The UNet paper's weight map of every training label, computed once (every rank computes its own:
        ~0.12 s a 512x512 ISBI slice, cheaper than shipping them; slices may differ in size, hence per slice)."""
        t0 = time.perf_counter()
        maps = [unet_weight_map(lab, WEIGHT_MAP_W0, WEIGHT_MAP_SIGMA) for lab in self.train_set.labels]
        self.say(narration.weight_maps_line(len(maps), time.perf_counter() - t0))
        return maps

    def new_model(self) -> UNet:
        """Freshly initialised weights (or ``--init-from``'s where they fit), the same on every rank."""
        c = self.config
        self.model_config = ModelConfig(in_channels=self.train_set.images[0].shape[0], base_filters=c.base_filters,
                                        depth=c.depth, padding=c.padding, batch_norm=c.batch_norm, dropout=c.dropout,
                                        num_classes=c.labels.class_count, class_names=c.labels.class_names)
        torch.manual_seed(c.data.seed)
        model = UNet(self.model_config)
        if c.init_from is not None:  # checked before anything is written; a resume then loads last.pt over it
            self.init, line = apply_init(model, read_init(c.init_from), c.labels)
            self.say(line)
        try:
            self.output_size = model.output_size(c.input_size)
        except ValueError as e:
            raise UserError(f"--input-size: {e}") from None
        if self.tiling.tile_size is not None:  # refused now, not at the first validation after minutes of training
            check_tile_budget(model, self.tiling.tile_size, self.tiling.memory_budget_mb)
        return model

    def already_done(self, resume: dict) -> dict:
        """A finished run found in ``model_dir``: said so, its summary returned, nothing redone."""
        self.say(narration.already_done_line(self.model_dir, resume["step"]))
        return resume.get("summary") or {"steps": int(resume["step"]), "model_dir": str(self.model_dir)}

    def build(self, model: UNet, resume: dict | None) -> None:
        """Model, optimizer, scaler, DDP/compile wrapper and data stream, from ``resume`` where given."""
        c = self.config
        if resume is not None:
            model = model_from_checkpoint(resume, self.model_dir / "last.pt")
        self.choose_memory_format(model, resume)
        self.model = self.dev.prepare_model(model)
        self.optimizer = torch.optim.Adam(parameter_groups(self.model, c.freeze_encoder_steps), lr=c.learning_rate,
                                          weight_decay=c.weight_decay, **self.dev.optimizer_kwargs())
        self.scaler = self.dev.grad_scaler()
        if resume is not None:
            self.step, self.best_dice_nvidia, self.best_step = checkpoints.load_state(resume, self.optimizer,
                                                                                      self.scaler)
            self.init = resume.get("init", self.init)
        self.forward_loss = self.compiled_step()
        self.workers = default_workers(self.dev.type) if c.workers is None else c.workers
        augment = AugmentConfig.level(c.augment_level) if c.augment else False
        stream = TrainTiles(self.train_set, c.input_size, self.output_size, augment=augment, seed=c.data.seed,
                            rank=self.dist.rank, world_size=self.dist.world_size,
                            start_index=self.step * c.batch_size, weights=self.train_weights)
        # Starting the loader draws from torch's generator, so the dropout stream is set after it.
        loader = build_train_loader(stream, c.batch_size, self.workers, self.dev.pin_memory)
        self.batches = Prefetcher(iter(loader), self.dev)
        if resume is not None:
            self.dev.set_rng_state(resume["rng"])
        else:
            torch.manual_seed(c.data.seed + 1)  # dropout stream, independent of how many weights were drawn

    def choose_memory_format(self, model: UNet, resume: dict | None) -> None:
        """The run's layout (:mod:`unet.training.layout`): as asked, as the resumed run had it, or measured on the
        CPU by rank 0; its choice on every rank (DDP's buckets expect the same strides everywhere)."""
        c = self.config
        recorded = resume["args"].get("memory_format") if resume is not None else None
        shape = (c.batch_size, self.model_config.in_channels, c.input_size, c.input_size)
        # Only rank 0 measures (the others wait at the broadcast): one probe, and not slowed by its neighbours'.
        name, line = (choose_layout(c.memory_format, recorded, model.to(self.dev.device), self.dev, shape)
                      if self.dist.is_main else (None, None))
        name = broadcast_object(name)
        if line:
            self.say(line)
        self.config = dataclasses.replace(c, memory_format=name)
        self.dev = dataclasses.replace(self.dev, memory_format=MEMORY_FORMATS[name])

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

    def announce(self, resumed: bool) -> None:
        """The run's opening lines (rank 0 prints)."""
        for line in narration.opening_lines(self):
            self.say(line)
        if self.allocator_line:
            self.say(self.allocator_line)
        if resumed:
            self.say(narration.resuming_line(self.model_dir, self.step))

    def open_board(self, resumed: bool) -> TensorBoardLog | None:
        """TensorBoard's event files (rank 0), or None (check_config refused --tensorboard without the package)."""
        return open_tensorboard(self.model_dir, self.config.tensorboard, self.step if resumed else None, self.say)

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
        if self.board:  # rank 0 only; the other ranks do not wait for it
            self.board.pictures(self.step, validation_pictures(self.model, self.val_set, self.dev, self.tiling))
        self.say(narration.validation_line(self.step, metrics))
        if metrics["dice_nvidia"] > self.best_dice_nvidia:
            self.best_dice_nvidia, self.best_step = metrics["dice_nvidia"], self.step
            self.save("best.pt", metrics)
        return metrics

    def save(self, name: str, metrics: dict | None = None, summary: dict | None = None) -> None:
        """Rank 0 writes ``model_dir/name`` (in the background while training); every rank waits for the request."""
        state = {}
        if self.dist.is_main:  # only rank 0 writes: the others skip gathering the state
            state = dict(step=self.step, optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                         rng=self.dev.rng_state(), args=self.config.as_dict(), metrics=metrics or {},
                         best_dice_nvidia=self.best_dice_nvidia, best_step=self.best_step, summary=summary,
                         init=self.init)
        checkpoints.save(self.model_dir / name, self.model, self.dist, self.saver, **state)

    def finish(self) -> dict:
        """Final last.pt, summary.json and curves.png; returns the summary."""
        c, best = self.config, self.best_dice_nvidia
        summary = {"weights_identical_across_ranks": same_on_all_ranks(_weights_digest(self.model)),
                   "steps": self.step, "global_batch": self.global_batch, "world_size": self.dist.world_size,
                   "device": self.dev.name(), "amp": self.dev.amp_name,
                   "best_dice_nvidia": best if best > -math.inf else None, "best_step": self.best_step,
                   "final_validation": self.last_metrics, "model_dir": str(self.model_dir), "fold": c.data.fold,
                   "fold_scheme": c.data.fold_scheme, "data": str(self.data_name), "loss": c.loss,
                   "compile": c.compile, "compile_mode": c.compile_mode if c.compile else None,
                   "first_step_s": self.first_step_s, "held_out": self.held_out, "init": self.init}
        self.save("last.pt", self.last_metrics, summary=summary)
        if self.saver is not None:
            self.saver.flush()  # last.pt is on disk before summary.json says the run is done
        if self.dist.is_main:
            write_json(self.model_dir / "summary.json", summary)
            if self.board:
                self.board.close()
            plot_curves(self.log.read(), self.model_dir / "curves.png",
                        title=f"{self.held_out}, {self.data_name}")
            self.say(narration.done_line(summary))
        return summary
