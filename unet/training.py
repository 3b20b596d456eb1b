"""Training: one process per device (``python train.py`` or ``torchrun --nproc_per_node=N train.py``).

Steps, not epochs: every optimizer step consumes ``batch_size`` random overlap-tile crops per rank.
Rank 0 alone prints, logs and writes; validation metrics are summed over ranks before they are read.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from unet import distributed as D
from unet.atomic import make_folder
from unet.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from unet.cli import HelpFormatter, add_device_args, add_tiling_args, positive_int
from unet.data.folds import fold_indices
from unet.data.io import load_dataset
from unet.data.sampling import TrainTiles, build_train_loader, default_workers
from unet.device import DeviceSetup, device_module, setup_device
from unet.errors import UserError
from unet.losses import ce_dice_loss
from unet.model import PADDINGS, ModelConfig, UNet

# Arguments that define a run: resuming with any of them changed would silently mix two experiments.
RUN_IDENTITY = ("data_dir", "fold", "folds", "fold_scheme", "seed", "batch_size", "learning_rate",
                "weight_decay", "base_filters", "depth", "padding", "batch_norm", "dropout", "input_size",
                "augment", "amp", "amp_dtype", "world_size", "clip_grad")
# Under fp16 the scaler skips overflowing steps itself; only this many non-finite losses in a row are fatal.
MAX_NONFINITE_STREAK_FP16 = 20


class TrainingDiverged(UserError):
    """The loss became non-finite; the last good checkpoint is kept."""


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
    g.add_argument("--fold-scheme", "--fold_scheme", default="disjoint", choices=("disjoint", "nvidia"),
                   help="disjoint: every image validated exactly once; nvidia: UNet_Medical's overlapping folds")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="flips, rotations, elastic deformation, intensity changes")
    g.add_argument("--workers", type=int, default=None, help="data loader processes per rank (default: from CPUs)")
    g = p.add_argument_group("model")
    g.add_argument("--base-filters", "--base_filters", type=int, default=64, help="filters of the first level")
    g.add_argument("--depth", type=int, default=5, help="levels including the bottleneck")
    g.add_argument("--padding", default="valid", choices=PADDINGS,
                   help="valid: unpadded convolutions as in UNet_Medical; same: output size = input size")
    g.add_argument("--batch-norm", "--batch_norm", action="store_true", help="BatchNorm after each 3x3 conv")
    g.add_argument("--dropout", type=float, default=0.5, help="dropout after the bottleneck (training only)")
    g.add_argument("--input-size", "--input_size", type=int, default=None,
                   help="training crop size fed to the model (default: 572 for valid, 256 for same)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", "--batch_size", type=positive_int, default=8, help="crops per step per device")
    g.add_argument("--learning-rate", "--learning_rate", type=float, default=1e-4, help="Adam learning rate")
    g.add_argument("--weight-decay", "--weight_decay", type=float, default=5e-4,
                   help="L2 weight decay, applied (UNet_Medical's TF1 code never applied its own)")
    g.add_argument("--max-steps", "--max_steps", type=positive_int, default=6400, help="optimizer steps in total")
    g.add_argument("--clip-grad", "--clip_grad", type=float, default=None, help="clip the gradient norm to this")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, data stream and dropout")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
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
    add_device_args(p)
    add_tiling_args(p)
    return p


def _identity(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in RUN_IDENTITY}


def _check_args(args: argparse.Namespace) -> None:
    if args.evaluate_every < 0:
        raise UserError(f"--evaluate-every must be 0 or more, got {args.evaluate_every}")
    if args.benchmark and args.warmup_steps < 0:
        raise UserError(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")


def _rng_state(dev: DeviceSetup) -> dict:
    # Only torch's generators drive training randomness (dropout); data augmentation draws from
    # per-sample generators seeded by (seed, rank, sample index), so the stream position is the step.
    state = {"torch": torch.get_rng_state()}
    if dev.type != "cpu":
        state["device"] = device_module(dev.type).get_rng_state(dev.device)
    return state


def _set_rng_state(state: dict, dev: DeviceSetup) -> None:
    torch.set_rng_state(state["torch"])
    if dev.type != "cpu" and "device" in state:
        device_module(dev.type).set_rng_state(state["device"], dev.device)


def train_step(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler, dev: DeviceSetup, clip_grad: float | None = None) -> torch.Tensor:
    """One optimizer step; returns the (detached) loss, left on the device.

    Autocast forward, float32 CE + soft Dice, then scale -> backward -> unscale -> optional clip -> step ->
    update (the scaler is a no-op unless fp16). A step whose gradients overflowed is skipped by the scaler.
    """
    images, labels = dev.to_device(images), dev.to_device(labels)
    with dev.autocast():
        logits = net(images)
    loss = ce_dice_loss(logits, labels)
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
    import hashlib
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _find_run(args, model_dir: Path) -> dict | None:
    """The checkpoint to resume from, None to start fresh; refuses to clobber a different run."""
    last = model_dir / "last.pt"
    if args.overwrite:
        return None
    if not last.exists():
        if args.resume:
            raise UserError(f"--resume: there is no {last} to resume from; drop --resume to start a new run")
        return None
    ckpt = load_checkpoint(last)
    saved = {k: ckpt.get("args", {}).get(k) for k in RUN_IDENTITY}
    diff = [f"--{k.replace('_', '-')} {saved[k]!r} there vs {v!r} now" for k, v in _identity(args).items()
            if saved[k] != v]
    if diff:
        raise UserError(f"{model_dir} holds a different run ({'; '.join(diff[:3])}); pass the same arguments to "
                        f"resume it, --overwrite to start over, or another --model-dir")
    return ckpt


def main(args: argparse.Namespace) -> dict:
    """Train (or benchmark) as ``args`` say; returns the final summary (on every rank)."""
    _check_args(args)
    info = D.env_info()
    args.world_size = info.world_size
    dev = setup_device(args.device, amp=args.amp, amp_dtype=args.amp_dtype, local_rank=info.local_rank)
    args.amp_dtype = dev.amp_name if args.amp else None
    with D.process_group(info, dev.backend, dev.device):
        return _train(args, info, dev)


def _train(args: argparse.Namespace, info: D.DistInfo, dev: DeviceSetup) -> dict:
    model_dir = Path(args.model_dir)
    say = print if info.is_main else (lambda *a, **k: None)

    slices = load_dataset(args.data_dir)
    train_idx, val_idx = fold_indices(len(slices), args.fold, args.folds, args.fold_scheme, args.seed)
    train_set, val_set = slices.subset(train_idx), slices.subset(val_idx)
    in_channels = train_set.images[0].shape[0]

    config = ModelConfig(in_channels=in_channels, base_filters=args.base_filters, depth=args.depth,
                         padding=args.padding, batch_norm=args.batch_norm, dropout=args.dropout)
    if args.input_size is None:
        args.input_size = 572 if args.padding == "valid" else 256
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = UNet(config)
    try:
        output_size = model.output_size(args.input_size)
    except ValueError as e:
        raise UserError(f"--input-size: {e}") from None

    resume = None
    if info.is_main and not args.benchmark:
        make_folder(model_dir, "--model-dir")
        resume = _find_run(args, model_dir)
    # Every rank must agree whether (and from which step) to resume before touching the model.
    resume_step = D.broadcast_object(resume["step"] if resume is not None else None)
    if resume_step is not None and resume is None:
        resume = load_checkpoint(model_dir / "last.pt")
    if resume is not None and int(resume["step"]) >= args.max_steps:
        say(f"{model_dir} holds a finished run ({resume['step']} steps); nothing to do. Raise --max-steps to "
            f"train on, or pass --overwrite to start over")
        return resume.get("summary") or {"steps": int(resume["step"]), "model_dir": str(model_dir)}
    if resume is not None:
        model = model_from_checkpoint(resume, model_dir / "last.pt")

    model = dev.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scaler = dev.grad_scaler()
    step, best, history_best_step = 0, -math.inf, None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        step = int(resume["step"])
        best = resume.get("best_dice", -math.inf)
        history_best_step = resume.get("best_step")

    net = model
    if info.distributed:
        net = DistributedDataParallel(model, device_ids=None if dev.type == "cpu" else [dev.device])
    if args.compile:
        net = torch.compile(net)

    workers = default_workers() if args.workers is None else args.workers
    stream = TrainTiles(train_set, args.input_size, output_size, augment=args.augment, seed=args.seed,
                        rank=info.rank, world_size=info.world_size, start_index=step * args.batch_size)
    loader = build_train_loader(stream, args.batch_size, workers, dev.pin_memory)
    # Starting the loader draws from torch's generator, so the dropout stream is set after it.
    batches = iter(loader)
    if resume is not None:
        _set_rng_state(resume["rng"], dev)
    else:
        torch.manual_seed(args.seed + 1)  # dropout stream, independent of how many weights were drawn

    global_batch = args.batch_size * info.world_size
    data_name = args.data_dir or "built-in synthetic EM set"
    say(f"unet-train: {dev.name()} ({dev.type}, {dev.amp_name}) x {info.world_size} process(es); "
        f"global batch {global_batch} = {args.batch_size} per device x {info.world_size}")
    say(f"data: {data_name}: {len(train_set)} training / {len(val_set)} validation slices "
        f"(fold {args.fold} of {args.folds}, {args.fold_scheme}); crops {args.input_size} -> {output_size}, "
        f"augment {'on' if args.augment else 'off'}, {workers} loader worker(s)")
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {config.padding} padding, "
        f"base {config.base_filters} filters, depth {config.depth}")
    if resume is not None:
        say(f"resuming {model_dir / 'last.pt'} at step {step}")

    if args.benchmark:
        return _benchmark(args, info, dev, net, model, optimizer, scaler, batches, global_batch, say)

    from unet.run_log import MetricsLog, plot_curves, write_json
    log = MetricsLog(model_dir / "metrics.jsonl", resume_step=step if resume is not None else None) \
        if info.is_main else None

    def save(name: str, metrics: dict | None = None, summary: dict | None = None):
        if info.is_main:
            save_checkpoint(model_dir / name, model, step=step, optimizer=optimizer.state_dict(),
                            scaler=scaler.state_dict(), rng=_rng_state(dev), args=dict(vars(args)),
                            metrics=metrics or {}, best_dice=best, best_step=history_best_step,
                            summary=summary)
        D.barrier()

    def validate() -> dict | None:
        nonlocal best, history_best_step
        if not len(val_set):
            return None
        from unet.evaluation import evaluate_slices
        # evaluate_slices runs the model in eval mode (no dropout) and restores training mode after.
        metrics = evaluate_slices(model, val_set, dev, dist_info=info, tile_size=args.tile_size,
                                  tile_batch=args.tile_batch, overlap=args.overlap, blend=args.blend, tta=args.tta)
        if log:
            log.write({"kind": "val", "step": step, "val": metrics})
        say(f"step {step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                     if k in ("dice_nvidia", "dice_mean", "iou_mean", "v_rand",
                                                              "v_info")))
        if metrics["dice_nvidia"] > best:
            best, history_best_step = metrics["dice_nvidia"], step
            save("best.pt", metrics)
        return metrics

    from tqdm import tqdm
    bar = tqdm(total=args.max_steps, initial=step, disable=not info.is_main or args.no_progress,
               unit="step", dynamic_ncols=True, smoothing=0.1)
    fp16 = scaler.is_enabled()
    limit = MAX_NONFINITE_STREAK_FP16 if fp16 else 1
    streak = torch.zeros((), device=dev.device)
    first_bad = torch.full((), -1, device=dev.device, dtype=torch.long)
    # Sum and count of the finite losses since the last log (steps the fp16 scaler skipped are left out).
    loss_sum, finite_count = torch.zeros((), device=dev.device), torch.zeros((), device=dev.device)
    loss_count, t_log, last_metrics = 0, time.perf_counter(), None
    model.train()
    last_good_step = step if resume is not None else None  # None: this run has written no last.pt yet
    while step < args.max_steps:
        loss = train_step(net, *next(batches), optimizer, scaler, dev, clip_grad=args.clip_grad)
        step += 1
        # Divergence bookkeeping stays on the device: no host sync per step.
        finite = torch.isfinite(loss)
        streak = torch.where(finite, torch.zeros_like(streak), streak + 1)
        first_bad = torch.where((first_bad < 0) & (streak >= limit), torch.full_like(first_bad, step), first_bad)
        loss_sum += torch.where(finite, loss, torch.zeros_like(loss_sum))
        finite_count += finite
        loss_count += 1
        bar.update(1)

        at_end = step == args.max_steps
        do_log = step % args.log_every == 0 or at_end
        do_eval = (args.evaluate_every and step % args.evaluate_every == 0) or at_end
        do_save = step % args.save_every == 0 or at_end
        if do_log or do_eval or do_save:
            # The earliest bad step on any rank; ranks without one report a step past the end.
            never = torch.full_like(first_bad, args.max_steps + 1)
            bad = int(D.all_reduce_min(torch.where(first_bad < 0, never, first_bad), dev.device).item())
            if bad <= args.max_steps:
                kept = ("no checkpoint was written" if last_good_step is None else
                        f"keeping the last good checkpoint {model_dir / 'last.pt'} (step {last_good_step})")
                raise TrainingDiverged(
                    f"the loss became non-finite at step {bad}"
                    f"{f' ({MAX_NONFINITE_STREAK_FP16} steps in a row, beyond what fp16 loss scaling skips)' if fp16 else ''}; "
                    f"stopped, {kept}; "
                    f"try a lower --learning-rate, --clip-grad 1.0 or --amp-dtype bf16")
        if do_log:
            total = D.all_reduce_sum(torch.stack([loss_sum, finite_count]), dev.device)
            mean_loss = (total[0] / total[1]).item()  # NaN (logged as null) if the scaler skipped every step
            now = time.perf_counter()
            ips = loss_count * global_batch / (now - t_log)
            if log:
                log.write({"kind": "train", "step": step, "loss": mean_loss, "lr": args.learning_rate,
                           "images_per_s": ips, "loss_scale": scaler.get_scale() if fp16 else None})
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.1f}")
            loss_sum.zero_()
            finite_count.zero_()
            loss_count, t_log = 0, time.perf_counter()
        if do_eval:
            last_metrics = validate() or last_metrics
            t_log = time.perf_counter()  # validation time is not training throughput
        if do_save and not at_end:
            save("last.pt", last_metrics)
            last_good_step = step
    bar.close()

    summary = {"weights_identical_across_ranks": D.same_on_all_ranks(_weights_digest(model)), "steps": step,
               "global_batch": global_batch, "world_size": info.world_size, "device": dev.name(),
               "amp": dev.amp_name, "best_dice_nvidia": best if best > -math.inf else None,
               "best_step": history_best_step, "final_validation": last_metrics, "model_dir": str(model_dir),
               "fold": args.fold, "fold_scheme": args.fold_scheme, "data": str(data_name)}
    save("last.pt", last_metrics, summary=summary)
    if info.is_main:
        write_json(model_dir / "summary.json", summary)
        plot_curves(log.read(), model_dir / "curves.png",
                    title=f"fold {args.fold} ({args.fold_scheme}), {data_name}")
        say(f"done: {step} steps; best dice_nvidia {summary['best_dice_nvidia']} at step {history_best_step}; "
            f"files in {model_dir}")
    return summary


def _benchmark(args, info, dev, net, model, optimizer, scaler, batches, global_batch, say) -> dict:
    """Time ``max_steps`` training steps after ``warmup_steps``, device synchronised."""
    from unet.benchmarking import PRECISION_DTYPES, measure_cpu_peak, model_flops, peak_source, time_steps

    flops_per_image = model_flops(model, (1, model.config.in_channels, args.input_size, args.input_size))

    def one_step():
        train_step(net, *next(batches), optimizer, scaler, dev, clip_grad=args.clip_grad)

    model.train()
    _, step_time = time_steps(one_step, args.warmup_steps, args.max_steps, dev, barrier=D.barrier)
    peak_memory = dev.peak_memory_bytes()  # read before the CPU peak measurement adds its own buffers
    images_per_s = global_batch / step_time
    achieved = flops_per_image * args.batch_size / step_time  # per device
    precision = dev.amp_name
    cpu_peaks = ({precision: measure_cpu_peak(PRECISION_DTYPES[precision])}
                 if dev.type == "cpu" and not args.peak_tflops else {})
    peak, source = peak_source(dev, precision, cpu_peaks, args.peak_tflops)
    result = {"images_per_s": images_per_s, "step_time_ms": step_time * 1e3, "global_batch": global_batch,
              "world_size": info.world_size, "batch_per_device": args.batch_size, "input_size": args.input_size,
              "amp": dev.amp_name, "compile": args.compile, "device": dev.name(),
              "peak_memory_mb": peak_memory / 2 ** 20, "gflop_per_image": flops_per_image / 1e9,
              "achieved_tflops_per_device": achieved / 1e12,
              "peak_tflops": peak / 1e12 if peak else None, "peak_source": source,
              "mfu": achieved / peak if peak else None, "steps": args.max_steps, "warmup_steps": args.warmup_steps}
    say("benchmark: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in result.items()))
    if info.is_main:
        from unet.run_log import write_json
        Path(args.model_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.model_dir) / "benchmark.json", result)
    return result
