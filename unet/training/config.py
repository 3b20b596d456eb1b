"""A training run's settings: :class:`RunConfig`, one ``option(...)`` field per train.py flag.

The command wing (:mod:`unet.cli.train`) builds the parser from these fields and the config from the parsed
arguments; the library takes the config alone. Checkpoints store :meth:`RunConfig.as_dict`: the flat keys of
earlier versions (``data_dir``, ``fold``, ..., ``tile_size``, ...), which evaluate.py and resumes read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from unet.data.augment import AUGMENT_LEVELS
from unet.data.datasets import DataOptions
from unet.data.labels import LabelOptions
from unet.device import DeviceOptions
from unet.errors import UserError
from unet.host_memory import HOST_ALLOCATORS
from unet.io.volumes import VolumeOptions
from unet.model import PADDINGS
from unet.options import field_default, identity_fields, option, option_fields, positive_int
from unet.prediction.tiling import TilingOptions
from unet.training.layout import LAYOUT_CHOICES
from unet.training.lr_schedule import LR_SCHEDULES
from unet.training.tensorboard import tensorboard_installed

# --loss: NVIDIA UNet_Medical's CE + soft Dice, or the UNet paper's weighted cross-entropy (eq. 1-2).
LOSSES = ("ce_dice", "weighted_ce")
# The UNet paper's border weight and width (Ronneberger et al. 2015, eq. 2).
WEIGHT_MAP_W0, WEIGHT_MAP_SIGMA = 10.0, 5.0
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# train.py takes TilingOptions for its validation, except the memory budget (validation uses the default).
TILING_SKIP = ("memory_budget_mb",)
# The order of the flat keys checkpoints have always stored under "args" (earlier versions stored vars(args)
# plus world_size; flags added since come after world_size).
CHECKPOINT_ARGS = ("data_dir", "fold", "folds", "fold_scheme", "augment", "workers", "base_filters", "depth",
                   "padding", "batch_norm", "dropout", "input_size", "batch_size", "learning_rate",
                   "weight_decay", "max_steps", "clip_grad", "seed", "compile", "model_dir", "evaluate_every",
                   "log_every", "save_every", "resume", "overwrite", "no_progress", "benchmark", "warmup_steps",
                   "peak_tflops", "device", "amp", "amp_dtype", "tile_size", "tile_batch", "overlap", "blend",
                   "tta", "world_size", "loss", "compile_mode", "lr_schedule", "lr_warmup_steps", "augment_level",
                   "train_images", "train_labels", "val_images", "val_labels", "val_slices", "label_kind",
                   "num_classes", "ignore_label", "init_from", "freeze_encoder_steps", "tensorboard",
                   "memory_format", "scale", "channel", "time", "host_allocator")
# Adam's rate without --learning-rate: UNet_Medical's 1e-4 from scratch; a tenth of it when fine-tuning
# (--init-from), so that a handful of slices adjusts the trained weights instead of overwriting them.
DEFAULT_LEARNING_RATE, FINE_TUNE_LEARNING_RATE = 1e-4, 1e-5


def _alias(flag: str) -> tuple[str, str]:
    """``--batch-size`` and NVIDIA's ``--batch_size`` spelling."""
    return flag, "--" + flag[2:].replace("-", "_")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; built once, never edited (:meth:`resolved` returns a copy).

    Attributes beyond the flags: ``data`` (:class:`DataOptions`), ``labels`` (:class:`LabelOptions`), ``volume``
    (:class:`VolumeOptions`: the level, channel and time point read of chunked training volumes),
    ``device_options`` (:class:`DeviceOptions`, the requested device and precision), ``tiling`` (:class:`TilingOptions`, validation's tiling),
    ``amp_dtype`` (the dtype autocast really uses, None without ``--amp``) and ``world_size``.
    """

    augment: bool = option(True, "flips, rotations, elastic deformation, intensity changes", name="augment",
                           switch="both", group="data", identity=True)
    augment_level: str = option(
        "full", "with --augment: full (flips, free rotation, elastic, grey values), geometric (no grey-value "
                "changes) or flips (flips and quarter turns only)", flags=_alias("--augment-level"),
        choices=AUGMENT_LEVELS, group="data", identity=True)
    workers: int | None = option(None, "data loader processes per rank (default: 0 when training on the CPU, "
                                       "whose cores the model's threads use; else one per spare CPU, at most 8)",
                                 name="workers", parse=int, group="data")
    base_filters: int = option(64, "filters of the first level", flags=_alias("--base-filters"), parse=int,
                               group="model", identity=True)
    depth: int = option(5, "levels including the bottleneck", name="depth", parse=int, group="model",
                        identity=True)
    padding: str = option("valid", "valid: unpadded convolutions as in UNet_Medical; same: output size = input "
                                   "size", name="padding", choices=PADDINGS, group="model", identity=True)
    batch_norm: bool = option(False, "BatchNorm after each 3x3 conv", flags=_alias("--batch-norm"), switch="both",
                              group="model", identity=True)
    dropout: float = option(0.5, "dropout after the bottleneck (training only)", name="dropout", parse=float,
                            group="model", identity=True)
    # None on the command line means "by padding"; resolved() fills it in.
    input_size: int | None = option(None, "training crop size fed to the model (default: 572 for valid, 256 for "
                                          "same)", flags=_alias("--input-size"), parse=int, group="model",
                                    identity=True)
    batch_size: int = option(8, "crops per step per device", flags=_alias("--batch-size"), parse=positive_int,
                             group="optimisation", identity=True)
    # None on the command line means "by --init-from"; resolved() fills it in.
    learning_rate: float | None = option(
        None, f"Adam learning rate (the peak, with a warm-up or a decaying --lr-schedule) (default: "
              f"{DEFAULT_LEARNING_RATE:g}, or {FINE_TUNE_LEARNING_RATE:g} with --init-from)",
        flags=_alias("--learning-rate"), parse=float, group="optimisation", identity=True)
    lr_schedule: str = option("constant", "constant (UNet_Medical); cosine or poly (nnU-Net's (1 - t)^0.9) decay "
                                          "to 0 at --max-steps", flags=_alias("--lr-schedule"),
                              choices=LR_SCHEDULES, group="optimisation", identity=True)
    lr_warmup_steps: int = option(0, "linear learning-rate warm-up over the first N steps",
                                  flags=_alias("--lr-warmup-steps"), parse=int, group="optimisation",
                                  identity=True)
    weight_decay: float = option(5e-4, "L2 weight decay, applied (UNet_Medical's TF1 code never applied its own)",
                                 flags=_alias("--weight-decay"), parse=float, group="optimisation", identity=True)
    max_steps: int = option(6400, "optimizer steps in total", flags=_alias("--max-steps"), parse=positive_int,
                            group="optimisation")
    clip_grad: float | None = option(None, "clip the gradient norm to this", flags=_alias("--clip-grad"),
                                     parse=float, group="optimisation", identity=True)
    loss: str = option("ce_dice", "ce_dice: cross-entropy + (1 - soft Dice) as UNet_Medical; weighted_ce: the "
                                  "UNet paper's pixel-weighted cross-entropy (class balance + border term, "
                                  f"w0={WEIGHT_MAP_W0:g}, sigma={WEIGHT_MAP_SIGMA:g} px)", name="loss",
                       choices=LOSSES, group="optimisation", identity=True)
    # None on the command line means "as the device prefers"; resolved() fills it in.
    compile: bool | None = option(None, "torch.compile forward + loss as one function; default (None): on for "
                                        "CUDA, off on CPU (measured slower there) and NPU (not measured there)",
                                  name="compile", switch="both", group="optimisation")
    compile_mode: str = option("default", "torch.compile mode when compiling (torch's default; the GPU check "
                                          "measures the others)", flags=_alias("--compile-mode"),
                               choices=COMPILE_MODES, group="optimisation")
    memory_format: str = option("auto", "tensor layout of the model and batches: auto = channels_last on CUDA, NCHW "
                                        "on the NPU, and on the CPU whichever of the two one training step measures "
                                        "faster at the start (printed; a resumed run keeps its layout)",
                                flags=_alias("--memory-format"), choices=LAYOUT_CHOICES, group="optimisation")
    host_allocator: str = option("auto", "auto: on the CPU (Linux, glibc) freed memory stays in the heap for the next "
                                         "step instead of one mmap per large tensor (fp32 training +9-25 % on a "
                                         "2-core Xeon, docs/benchmarks.md; printed); system: the C library's defaults",
                                 flags=_alias("--host-allocator"), choices=HOST_ALLOCATORS, group="optimisation")
    model_dir: str = option("results", "checkpoints, logs and curves go here", flags=_alias("--model-dir"),
                            group="run")
    evaluate_every: int = option(0, "validate every N steps (0: only at the end)", flags=_alias("--evaluate-every"),
                                 parse=int, group="run")
    log_every: int = option(20, "log the loss every N steps", flags=_alias("--log-every"), parse=positive_int,
                            group="run")
    save_every: int = option(200, "write last.pt every N steps", flags=_alias("--save-every"), parse=positive_int,
                             group="run")
    resume: bool = option(False, "require resuming from MODEL_DIR/last.pt (a matching run there is resumed "
                                 "anyway)", name="resume", switch="on", group="run")
    overwrite: bool = option(False, "start over even if MODEL_DIR holds a run", name="overwrite", switch="on",
                             group="run")
    no_progress: bool = option(False, "no progress bar (logs only)", name="no_progress", switch="on", group="run")
    tensorboard: bool | None = option(None, "TensorBoard event files in --model-dir/tensorboard (losses, learning "
                                            "rate, validation metrics and pictures); default: on when the "
                                            "tensorboard package is installed", name="tensorboard", switch="both",
                                      group="run")
    benchmark: bool = option(False, "time --max-steps steps after --warmup-steps; no checkpoints, no validation",
                             name="benchmark", switch="on", group="benchmark")
    warmup_steps: int = option(10, "untimed steps before timing in --benchmark mode", flags=_alias("--warmup-steps"),
                               parse=int, group="benchmark")
    peak_tflops: float | None = option(None, "device peak (TFLOP/s) for MFU; default: known accelerators, "
                                             "measured matmul peak on CPU", name="peak_tflops", parse=float,
                                       group="benchmark")
    init_from: str | None = option(None, "fine-tune: start from this train.py checkpoint or bioimage.io package "
                                         "(.zip, folder or rdf.yaml; this project's or another UNet's of the same "
                                         "geometry); weights load where shapes agree",
                                   flags="--init-from", metavar="PATH", group="fine-tuning", identity=True)
    freeze_encoder_steps: int = option(0, "with --init-from: keep the encoder (down path and bottleneck) fixed for "
                                          "the first N steps (0: never, -1: the whole run)",
                                       flags="--freeze-encoder-steps", parse=int, group="fine-tuning",
                                       identity=True)
    data: DataOptions = field(default_factory=DataOptions)
    labels: LabelOptions = field(default_factory=LabelOptions)
    volume: VolumeOptions = field(default_factory=VolumeOptions)
    device_options: DeviceOptions = field(default_factory=DeviceOptions)
    tiling: TilingOptions = field(default_factory=TilingOptions)
    amp_dtype: str | None = None
    world_size: int = 1

    def resolved(self, *, world_size: int, amp_dtype: str | None, compile_default: bool = False) -> "RunConfig":
        """The derived values filled in, in this one place: the crop size by padding, the learning rate by
        ``--init-from``, ``compile`` as the flags say or else ``compile_default`` (the device's choice), the dtype
        autocast uses and the world size."""
        input_size = self.input_size if self.input_size is not None else (572 if self.padding == "valid" else 256)
        rate = self.learning_rate
        if rate is None:
            rate = FINE_TUNE_LEARNING_RATE if self.init_from is not None else DEFAULT_LEARNING_RATE
        return dataclasses.replace(self, input_size=input_size, world_size=world_size, amp_dtype=amp_dtype,
                                   learning_rate=rate,
                                   compile=compile_default if self.compile is None else self.compile)

    def as_dict(self) -> dict:
        """The flat dict checkpoints store under ``"args"`` (``weights_only`` loads no dataclasses)."""
        flat = {**asdict(self.data), **asdict(self.labels), **asdict(self.volume), "device": self.device_options.device,
                "amp": self.device_options.amp,
                **{k: v for k, v in asdict(self.tiling).items() if k not in TILING_SKIP},
                **{f.name: getattr(self, f.name) for f, _ in option_fields(self)},
                "amp_dtype": self.amp_dtype, "world_size": self.world_size}
        return {k: flat[k] for k in CHECKPOINT_ARGS}

    def identity(self) -> dict:
        """The :data:`RUN_IDENTITY` values."""
        flat = self.as_dict()
        return {k: flat[k] for k in RUN_IDENTITY}


# Settings that define a run: resuming with any of them changed would silently mix two experiments. The device
# and the world size are no RunConfig flags, hence named here: the precision autocast really used counts.
RUN_IDENTITY = (identity_fields(DataOptions) + identity_fields(LabelOptions) + identity_fields(RunConfig)
                + ("scale", "channel", "time", "amp", "amp_dtype", "world_size"))


def identity_default(key: str):
    """What a checkpoint written before the identity setting ``key`` existed ran with: a key missing from an
    older checkpoint's ``"args"`` means that field's default (the flag's default then and now)."""
    for cls in (DataOptions, LabelOptions, VolumeOptions, RunConfig):
        for f, _ in option_fields(cls):
            if f.name == key:
                return field_default(f)
    return None


def check_config(config: RunConfig) -> None:
    """Refuse settings that the flags' types cannot: one UserError naming the flag."""
    c = config
    if c.evaluate_every < 0:
        raise UserError(f"--evaluate-every must be 0 or more, got {c.evaluate_every}")
    if c.benchmark and c.warmup_steps < 0:
        raise UserError(f"--warmup-steps must be 0 or more, got {c.warmup_steps}")
    if c.lr_warmup_steps < 0 or (not c.benchmark and c.lr_warmup_steps >= c.max_steps):
        raise UserError(f"--lr-warmup-steps must be 0 or more and below --max-steps {c.max_steps}, "
                        f"got {c.lr_warmup_steps}")
    if c.resume and c.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    if c.tensorboard and not tensorboard_installed():
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if c.freeze_encoder_steps < -1:
        raise UserError(f"--freeze-encoder-steps must be -1 (the whole run), 0 (never) or a step count, got "
                        f"{c.freeze_encoder_steps}")
    if c.freeze_encoder_steps and c.init_from is None:
        raise UserError("--freeze-encoder-steps needs --init-from: a freshly initialised encoder is not worth "
                        "keeping fixed")
