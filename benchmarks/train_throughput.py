"""Training-step throughput of the UNet: forward + CE+Dice loss + backward + Adam step, device synchronised.

    python benchmarks/train_throughput.py [--device auto] [--models reference,small] [--batch-sizes 1,8]
        [--precisions fp32,bf16,fp16] [--compile off|on|both] [--layouts device|both|channels_last|contiguous]
        [--steps N] [--warmup N] [--peak-tflops T] [--peak-seconds S] [--json OUT] [--quick]

One row per (model, batch, precision, compile, layout): images/s, step time, peak memory, GFLOP/image
(forward + backward, counted on the meta device), achieved TFLOP/s and MFU. Inputs are random tensors
already on the device, so the rows measure the model step alone (train.py --benchmark includes the loader).
MFU: on CPU against this machine's best dense kernel (matmul or 3x3 conv) for the dtype, measured in the same
run; on an accelerator against --peak-tflops or the device's 16-bit datasheet peak (none for fp32).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (LAYOUTS, MODELS, QUICK_MODEL, MfuPeaks, ModelSpec, add_peak_args, csv_list,  # noqa: E402
                    device_for, machine_header, machine_record, print_table, usable_precisions, write_json)

from unet.benchmarking import model_flops, time_steps  # noqa: E402
from unet.device import DEVICE_CHOICES  # noqa: E402
from unet.training.trainer import forward_loss_fn, optimizer_step  # noqa: E402

COLUMNS = [("model", "model"), ("batch", "batch"), ("precision", "prec"), ("compile", "compile"),
           ("layout", "layout"), ("images_per_s", "images/s"), ("step_ms", "step ms"),
           ("peak_memory_mb", "peak MB"), ("gflop_per_image", "GFLOP/img"), ("achieved_tflops", "TFLOP/s"),
           ("mfu", "MFU")]
# Steps when --steps/--warmup are not given. The reference model takes ~10-20 s per batch-8 step on 2 CPU
# cores, so the CPU default is tiny (the whole default CPU run is a few minutes); accelerators get 20 + 50.
DEFAULT_STEPS = {"cpu": (1, 2), "accelerator": (20, 50)}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\nDefault on CPU: reference + small, batch 1 and 8, fp32 + bf16, "
        "eager, 1 warmup + 2 timed steps: a few minutes on 2 cores (a reference batch-8 step is 10-20 s there). "
        "Default on CUDA/NPU: 20 warmup + 50 timed steps, fp32 + bf16 + fp16.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--models", type=csv_list, default=["reference", "small"],
                   help=f"comma list of {', '.join(MODELS)} (reference: 572 -> 388; small: 256 'same')")
    p.add_argument("--batch-sizes", type=lambda s: csv_list(s, int), default=None,
                   help="comma list (default 1,8; --quick: 2)")
    p.add_argument("--precisions", type=csv_list, default=None,
                   help="comma list of fp32, bf16, fp16 (default: fp32,bf16 on CPU; all three elsewhere; "
                        "fp16 is skipped on CPU)")
    p.add_argument("--compile", default="off", choices=("off", "on", "both"),
                   help="torch.compile forward + loss as one function (train.py's --compile): off = eager rows, "
                        "on = compiled rows, both = one of each")
    p.add_argument("--layouts", default="device", choices=("device", "both") + tuple(LAYOUTS),
                   help="memory format: device = the device layer's choice (channels_last on CPU/CUDA, "
                        "contiguous on NPU); both = channels_last and contiguous rows")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 2 on CPU, 50 elsewhere)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 20 elsewhere)")
    add_peak_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the rows to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: small model at 64x64, batch 2, 1 warmup + 1 timed step")
    return p


def train_step_fn(model: torch.nn.Module, compiled: bool, dev, images: torch.Tensor, labels: torch.Tensor):
    """One training step as train.py takes it: autocast forward + fp32 CE+Dice (compiled as one function with
    ``compiled``, as train.py's --compile does), scaled backward, Adam (fused on CUDA: dev.optimizer_kwargs)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-4, **dev.optimizer_kwargs())
    scaler = dev.grad_scaler()
    forward_loss = forward_loss_fn(model, dev)
    if compiled:
        forward_loss = torch.compile(forward_loss)

    def step():
        optimizer_step(forward_loss, (images, labels), optimizer, scaler)
    return step


def bench_row(spec: ModelSpec, batch: int, precision: str, compiled: bool, layout: str, args,
              flops_per_image: int, peaks: MfuPeaks) -> dict:
    """Build the model fresh, warm up, time ``args.steps`` steps; one result row."""
    dev = dataclasses.replace(device_for(args.device, precision), memory_format=LAYOUTS[layout])
    torch.manual_seed(0)
    model = dev.prepare_model(spec.build()).train()
    size = spec.input_size
    out = model.output_size(size)
    images = dev.to_device(torch.rand(batch, model.config.in_channels, size, size))
    # uint8 class indices, as train.py's loader sends them
    labels = torch.randint(0, model.config.num_classes, (batch, out, out), device=dev.device, dtype=torch.uint8)
    warmup_s, step_s = time_steps(train_step_fn(model, compiled, dev, images, labels), args.warmup, args.steps, dev)
    ips = batch / step_s
    return {"model": spec.name, "input_size": size, "output_size": out, "batch": batch, "precision": precision,
            "compile": "on" if compiled else "off", "layout": layout, "images_per_s": ips,
            "step_ms": step_s * 1e3, "peak_memory_mb": dev.peak_memory_bytes() / 2 ** 20,
            "gflop_per_image": flops_per_image / 1e9, **peaks.fields(dev, precision, flops_per_image * ips),
            "steps": args.steps, "warmup_steps": args.warmup, "warmup_s": warmup_s}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    probe = device_for(args.device, "fp32")
    kind = "cpu" if probe.type == "cpu" else "accelerator"
    if args.quick:
        specs = [QUICK_MODEL]
        args.batch_sizes = args.batch_sizes or [2]
        warmup, steps = 1, 1
    else:
        unknown = [m for m in args.models if m not in MODELS]
        if unknown:
            raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
        specs = [MODELS[m] for m in args.models]
        args.batch_sizes = args.batch_sizes or [1, 8]
        warmup, steps = DEFAULT_STEPS[kind]
    args.warmup = warmup if args.warmup is None else args.warmup
    args.steps = steps if args.steps is None else args.steps
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    requested = args.precisions or (["fp32", "bf16"] if probe.type == "cpu" else ["fp32", "bf16", "fp16"])
    precisions, skipped = usable_precisions(requested, probe.type)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    device_layout = "channels_last" if probe.memory_format == torch.channels_last else "contiguous"
    layouts = {"device": [device_layout], "both": list(LAYOUTS)}.get(args.layouts, [args.layouts])

    print(machine_header("train throughput", probe))
    print(f"# step = forward + CE+Dice + backward + Adam, random inputs on the device; {args.warmup} warmup + "
          f"{args.steps} timed steps per row; device layout choice: {device_layout}")
    for note in skipped:
        print(f"# {note}")
    peaks = MfuPeaks(probe, precisions, args)

    rows = []
    for spec in specs:
        model = spec.build()
        flops = model_flops(model, (1, model.config.in_channels, spec.input_size, spec.input_size))
        print(f"# {spec.name}: UNet({', '.join(f'{k}={v!r}' for k, v in spec.kwargs.items())}) "
              f"{spec.input_size} -> {model.output_size(spec.input_size)}, "
              f"{flops / 1e9:.1f} GFLOP per image (forward + backward)")
        for batch in args.batch_sizes:
            for precision in precisions:
                for compiled in compiles:
                    for layout in layouts:
                        label = f"{spec.name} b{batch} {precision} compile={'on' if compiled else 'off'} {layout}"
                        print(f"  running {label} ...", file=sys.stderr, flush=True)
                        try:
                            rows.append(bench_row(spec, batch, precision, compiled, layout, args, flops, peaks))
                        except (RuntimeError, torch.OutOfMemoryError) as e:  # one bad row must not end a GPU run
                            msg = " ".join(str(e).split())[:200]
                            print(f"# FAILED {label}: {type(e).__name__}: {msg}")
                            rows.append({"model": spec.name, "batch": batch, "precision": precision,
                                         "compile": "on" if compiled else "off", "layout": layout,
                                         "error": f"{type(e).__name__}: {msg}"})
    peaks.finish(rows)
    print()
    print_table(COLUMNS, rows)
    write_json(args.json, {"benchmark": "train_throughput", "machine": machine_record(probe), **peaks.record(),
                           "rows": rows})
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
