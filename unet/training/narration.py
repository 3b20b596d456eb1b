"""What a training run says (rank 0 prints): the opening lines, validation lines, the summary's last line."""
from __future__ import annotations

import os
from pathlib import Path

try:  # a private torch module, used only to name inductor's cache folder in a message
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
except ImportError:  # another torch layout: the message says "torch's default" instead
    default_cache_dir = None

from unet import device
from unet.training.config import WEIGHT_MAP_SIGMA, WEIGHT_MAP_W0

# The validation metrics a run prints after each validation (all are logged).
PRINTED_METRICS = ("dice_nvidia", "dice_mean", "iou_mean", "v_rand", "v_info")


def opening_lines(trainer) -> list[str]:
    """The lines that open a run: device and batch, data, model and optimiser.

    Args:
        trainer: the built :class:`unet.training.trainer.Trainer`.
    """
    t = trainer
    c, cfg, ws = t.config, t.model_config, t.dist.world_size
    lr = (f"{c.learning_rate:g} {c.lr_schedule}"
          + (f" after {c.lr_warmup_steps} warm-up steps" if c.lr_warmup_steps else ""))
    return [
        f"unet-train: {t.dev.name()} ({t.dev.type}, {t.dev.amp_name}) x {ws} process(es); "
        f"global batch {t.global_batch} = {c.batch_size} per device x {ws}" + _emulated(t.dev),
        f"data: {t.data_name}: {len(t.train_set)} training / {len(t.val_set)} validation "
        f"slices ({t.held_out}); {_labels(c.labels)}; crops {c.input_size} -> "
        f"{t.output_size}, augment {c.augment_level if c.augment else 'off'}, {t.workers} loader worker(s)",
        f"model: {sum(p.numel() for p in t.model.parameters()):,} parameters, {cfg.padding} padding, "
        f"base {cfg.base_filters} filters, depth {cfg.depth}, {cfg.num_classes} classes; loss {c.loss}; step "
        + (f"compiled (mode {c.compile_mode})" if c.compile else "eager")
        + f"; Adam {'fused' if t.dev.optimizer_kwargs().get('fused') else 'default'}, learning rate " + lr
        + _freeze(c.freeze_encoder_steps)]


def _emulated(dev) -> str:
    """A warning when ``--amp`` asks a CPU for bf16 it can only emulate (torch converts to and from fp32 around
    fp32 kernels there), so the flag gains no speed and rounds for nothing."""
    if dev.type != "cpu" or dev.amp_name != "bf16" or device.native_bf16("cpu"):  # looked up late: tests patch it
        return ""
    return "; note: this CPU has no native bf16 (no AVX512_BF16 or AMX), torch emulates it: drop --amp for fp32"


def _labels(labels) -> str:
    ignore = f", ignore value {labels.ignore_label}" if labels.ignore_label is not None else ""
    return f"labels {labels.label_kind} ({labels.class_count} classes{ignore})"


def _freeze(steps: int) -> str:
    if not steps:
        return ""
    return "; encoder frozen for the whole run" if steps == -1 else f"; encoder frozen for the first {steps} steps"


def resuming_line(model_dir: Path, step: int) -> str:
    return f"resuming {model_dir / 'last.pt'} at step {step}"


def already_done_line(model_dir: Path, step: int) -> str:
    return (f"{model_dir} holds a finished run ({step} steps); nothing to do. Raise "
            f"--max-steps to train on, or pass --overwrite to start over")


def weight_maps_line(count: int, seconds: float) -> str:
    return (f"loss weighted_ce: weight maps of {count} training slices (w0 {WEIGHT_MAP_W0:g}, sigma "
            f"{WEIGHT_MAP_SIGMA:g} px) in {seconds:.1f} s")


def validation_line(step: int, metrics: dict) -> str:
    return f"step {step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                    if k in PRINTED_METRICS)


def compile_line(first_step_s: float, mode: str) -> str:
    return (f"compile: first step {first_step_s:.1f} s (torch.compile, mode {mode}; "
            f"kernels cached across runs in {inductor_cache_dir()})")


def done_line(summary: dict) -> str:
    return (f"done: {summary['steps']} steps; best dice_nvidia {summary['best_dice_nvidia']} at step "
            f"{summary['best_step']}; files in {summary['model_dir']}")


def benchmark_line(result: dict) -> str:
    return "benchmark: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in result.items())


def inductor_cache_dir() -> str:
    """Where torch.compile keeps compiled kernels between runs: ``$TORCHINDUCTOR_CACHE_DIR``, else torch's
    default (``/tmp/torchinductor_<user>``), so a second run of the same model and shapes compiles little."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or (default_cache_dir() if default_cache_dir
                                                         else "torch's default inductor cache folder")
