"""Inference throughput: (a) the model's forward pass on tiles, (b) infer.py end to end vs the forward pass alone.

    python benchmarks/inference_throughput.py [--device auto] [--model reference|small] [--precisions fp32,bf16]
        [--batch-sizes 1,2,4,8,16] [--slices 30] [--peak-tflops T] [--peak-seconds S] [--json OUT] [--profile]
        [--quick]

(a) images/s of eval-mode forward passes under inference_mode and the precision's autocast, on random tiles of
the model's input size (572 for the reference model), one row per (precision, batch).
(b) a synthetic uint8 stack of --slices 512x512 slices is written to a temporary TIFF, the model (random weights,
seed 0) to a temporary checkpoint; then infer.py's own code path (unet.cli.infer.main: load checkpoint, read,
tile, predict, write a compressed mask TIFF) is timed against predict_probabilities over the same slices already
in memory (the same tiler, tiles and batch, nothing else). The difference is infer.py's overhead; it should stay
under 10 %. --profile prints where infer.py's time goes (cProfile, top functions by cumulative time).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

from common import (MODELS, QUICK_MODEL, MfuPeaks, add_peak_args, csv_list, device_for, machine_header,  # noqa: E402
                    machine_record, print_table, usable_precisions, write_json)

from unet.cli import infer as inference  # noqa: E402

from unet.prediction import pipeline  # noqa: E402
from unet.benchmarking import model_flops, time_steps  # noqa: E402
from unet.checkpoint import load_model, save_checkpoint  # noqa: E402
from unet.io.images import scale_by_dtype  # noqa: E402
from unet.data.synthetic import make_synthetic_em  # noqa: E402
from unet.device import DEVICE_CHOICES  # noqa: E402
from unet.prediction.predictor import predict_probabilities, tiling_plan  # noqa: E402
from unet.prediction.tiling import TilingOptions  # noqa: E402

FORWARD_COLUMNS = [("model", "model"), ("tile", "tile"), ("batch", "batch"), ("precision", "prec"),
                   ("images_per_s", "images/s"), ("ms_per_batch", "ms/batch"), ("peak_memory_mb", "peak MB"),
                   ("gflop_per_image", "GFLOP/img"), ("achieved_tflops", "TFLOP/s"), ("mfu", "MFU")]
E2E_COLUMNS = [("precision", "prec"), ("slices", "slices"), ("tiling", "tiling"), ("forward_s", "forward s"),
               ("infer_s", "infer.py s"), ("forward_slices_per_s", "fwd slices/s"),
               ("infer_slices_per_s", "infer slices/s"), ("overhead_pct", "overhead %"),
               ("in_run_overhead_pct", "in-run %")]
OVERHEAD_LIMIT_PCT = 10.0
# (warmup, timed) forward passes per row when not given: a reference batch-16 forward is many seconds on
# 2 CPU cores, so the CPU default is one of each.
DEFAULT_ITERS = {"cpu": (1, 1), "accelerator": (10, 50)}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\nDefault on CPU: reference model, fp32, batch 1..16 with 1 warmup + "
        "1 timed pass, then 30 slices end to end twice (infer.py and forward alone): about 10 minutes on 2 cores; "
        "use --batch-sizes 1,4 --slices 10 for a shorter run. Default on CUDA/NPU: fp32,bf16,fp16, 10 + 50 passes.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--model", default="reference", choices=tuple(MODELS),
                   help="reference: UNet_Medical, 572 tiles; small: base 16 'same', 256 tiles")
    p.add_argument("--precisions", type=csv_list, default=None,
                   help="comma list of fp32, bf16, fp16 (default: fp32 on CPU; all three elsewhere; fp16 skipped on CPU)")
    p.add_argument("--batch-sizes", type=lambda s: csv_list(s, int), default=None,
                   help="forward-pass batches (default 1,2,4,8,16; --quick: 1,2)")
    p.add_argument("--iters", type=int, default=None, help="timed forward passes per row (default: 1 CPU, 50 else)")
    p.add_argument("--warmup", type=int, default=None, help="untimed passes first (default: 1 CPU, 10 else)")
    p.add_argument("--slices", type=int, default=None, help="slices of the end-to-end stack (default 30; 0 = skip)")
    p.add_argument("--slice-size", type=int, default=None, help="slice height and width (default 512)")
    p.add_argument("--tile-batch", type=int, default=TilingOptions.tile_batch,
                   help="tiles per forward pass in (b), as infer.py's default")
    add_peak_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="cProfile infer.py's run and print the top functions")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: small model, 64x64 tiles, batch 1,2, 3 slices of 64x64 end to end")
    return p


# ------------------------------------------------------------------------------------------ (a) forward

def forward_row(model, spec, dev, precision: str, batch: int, args, flops_per_image: int, peaks: MfuPeaks) -> dict:
    """Time eval forward passes of one batch of random tiles; one result row."""
    size = spec.input_size
    x = dev.to_device(torch.rand(batch, model.config.in_channels, size, size))

    def run():
        with dev.autocast():
            return model(x)
    with torch.inference_mode():
        _, per_batch = time_steps(run, args.warmup, args.iters, dev)
    ips = batch / per_batch
    return {"model": spec.name, "tile": size, "batch": batch, "precision": precision, "images_per_s": ips,
            "ms_per_batch": per_batch * 1e3, "peak_memory_mb": dev.peak_memory_bytes() / 2 ** 20,
            "gflop_per_image": flops_per_image / 1e9, **peaks.fields(dev, precision, flops_per_image * ips),
            "iters": args.iters, "warmup": args.warmup}


# ------------------------------------------------------------------------------------------ (b) end to end

def write_stack(path: Path, count: int, size: int) -> np.ndarray:
    """Write a synthetic uint8 EM stack as a plain multi-page TIFF; returns the pages."""
    images, _ = make_synthetic_em(count, size, size, seed=0)
    tifffile.imwrite(path, images, photometric="minisblack")
    return images


def forward_alone(ckpt: Path, pages: np.ndarray, dev, tile_batch: int) -> float:
    """Seconds of predict_probabilities over in-memory slices (same model and tiles as infer.py, but batched
    within each slice only: today's per-slice path; benchmarks/infer_pipeline.py times the forwards alone)."""
    model = dev.prepare_model(load_model(ckpt)[0])
    options = TilingOptions(tile_batch=tile_batch)
    images = [torch.from_numpy(scale_by_dtype(p[None])) for p in pages]
    predict_probabilities(model, images[0], dev, options)  # warm-up: kernel choice, allocator
    dev.synchronize()
    t0 = time.perf_counter()
    for image in images:
        predict_probabilities(model, image, dev, options)
    dev.synchronize()
    return time.perf_counter() - t0


@contextlib.contextmanager
def timed_predict_probabilities():
    """Count the seconds infer.py spends in its tile forwards (``unet.prediction.pipeline.predict_tiles``, synchronised).

    The pipeline calls the name predict_tiles in unet.prediction.pipeline, so wrapping that module attribute sees
    every forward (with TTA, all 8). Time outside it is infer.py's own overhead (reading, tiling, stitching,
    copies, writing as far as they do not overlap), measured in the same run and so immune to the load
    changes that make two separate runs on a shared machine hard to compare.
    """
    original = pipeline.predict_tiles
    spent = [0.0]

    def wrapper(predictor, batch, tta):
        t0 = time.perf_counter()
        probs = original(predictor, batch, tta)
        if batch.device.type != "cpu":
            torch.accelerator.synchronize()
        spent[0] += time.perf_counter() - t0
        return probs

    pipeline.predict_tiles = wrapper
    try:
        yield spent
    finally:
        pipeline.predict_tiles = original


def infer_main(ckpt: Path, stack: Path, out: Path, device: str, precision: str, tile_batch: int,
               profile: bool) -> tuple[float, float, object, str]:
    """Run unet.cli.infer.main as infer.py would.

    Returns:
        (wall seconds, seconds inside the tile forwards, RunResult, its stdout).
    """
    argv = ["--ckpt", str(ckpt), "--input", str(stack), "--output", str(out), "--device", device,
            "--tile-batch", str(tile_batch), "--no-progress", "--overwrite"]
    if precision != "fp32":
        argv += ["--amp", "--amp-dtype", precision]
    args = inference.get_args_parser().parse_args(argv)
    captured = io.StringIO()
    profiler = None
    if profile:
        import cProfile
        profiler = cProfile.Profile()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(io.StringIO()), \
            timed_predict_probabilities() as spent:
        t0 = time.perf_counter()
        result = profiler.runcall(inference.main, args) if profiler else inference.main(args)
        seconds = time.perf_counter() - t0
    if profiler is not None:
        import pstats
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(25)
        print(f"# cProfile of infer.py ({precision}), top 25 by cumulative time:")
        print("\n".join("#   " + line for line in stream.getvalue().splitlines() if line.strip()))
    return seconds, spent[0], result, captured.getvalue()


def end_to_end(spec, precision: str, args, workdir: Path) -> dict:
    """Time infer.py on the synthetic stack vs the forward pass alone; one result row."""
    torch.manual_seed(0)
    model = spec.build()
    ckpt = workdir / f"{spec.name}.pt"
    if not ckpt.exists():
        save_checkpoint(ckpt, model)
    stack = workdir / f"stack_{args.slices}x{args.slice_size}.tif"
    pages = write_stack(stack, args.slices, args.slice_size) if not stack.exists() else tifffile.imread(stack)
    plan = tiling_plan(model, args.slice_size, args.slice_size)
    dev = device_for(args.device, precision)
    fwd_s = forward_alone(ckpt, pages, dev, args.tile_batch)
    infer_s, predict_s, result, stdout = infer_main(ckpt, stack, workdir / f"masks_{precision}.tif", args.device, precision,
                                         args.tile_batch, args.profile)
    return {"precision": precision, "slices": args.slices, "slice_size": args.slice_size,
            "tiling": f"{plan['num_tiles']}x{plan['tile_size']}", "tile_plan": plan["description"],
            "forward_s": fwd_s, "infer_s": infer_s, "run_inference_s": result.seconds, "infer_predict_s": predict_s,
            "in_run_overhead_pct": 100 * (infer_s - predict_s) / predict_s,
            "forward_slices_per_s": args.slices / fwd_s, "infer_slices_per_s": args.slices / infer_s,
            "overhead_pct": 100 * (infer_s - fwd_s) / fwd_s,
            "run_inference_overhead_pct": 100 * (result.seconds - fwd_s) / fwd_s,
            "infer_stdout_last": stdout.strip().splitlines()[-1] if stdout.strip() else ""}


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    probe = device_for(args.device, "fp32")
    kind = "cpu" if probe.type == "cpu" else "accelerator"
    if args.quick:
        spec = QUICK_MODEL
        args.batch_sizes = args.batch_sizes or [1, 2]
        warmup, iters = 1, 1
        args.slices = 3 if args.slices is None else args.slices
        args.slice_size = args.slice_size or 64
    else:
        spec = MODELS[args.model]
        args.batch_sizes = args.batch_sizes or [1, 2, 4, 8, 16]
        warmup, iters = DEFAULT_ITERS[kind]
        args.slices = 30 if args.slices is None else args.slices
        args.slice_size = args.slice_size or 512
    args.warmup = warmup if args.warmup is None else args.warmup
    args.iters = iters if args.iters is None else args.iters
    if args.iters < 1 or args.warmup < 0 or args.slices < 0:
        raise SystemExit("--iters must be >= 1, --warmup and --slices >= 0")
    requested = args.precisions or (["fp32"] if probe.type == "cpu" else ["fp32", "bf16", "fp16"])
    precisions, skipped = usable_precisions(requested, probe.type)

    print(machine_header("inference throughput", probe))
    for note in skipped:
        print(f"# {note}")
    peaks = MfuPeaks(probe, precisions, args)
    model = spec.build()
    flops = model_flops(model, (1, model.config.in_channels, spec.input_size, spec.input_size), backward=False)
    print(f"\n(a) forward pass, eval + inference_mode + autocast, random {spec.input_size}x{spec.input_size} tiles, "
          f"{args.warmup} warmup + {args.iters} timed passes per row; {flops / 1e9:.1f} GFLOP per image")
    rows = []
    for precision in precisions:
        dev = device_for(args.device, precision)
        torch.manual_seed(0)
        model = dev.prepare_model(spec.build()).eval()
        for batch in args.batch_sizes:
            print(f"  running forward {precision} b{batch} ...", file=sys.stderr, flush=True)
            try:
                rows.append(forward_row(model, spec, dev, precision, batch, args, flops, peaks))
            except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. out of memory at batch 16: keep going
                msg = " ".join(str(e).split())[:200]
                print(f"# FAILED forward {precision} b{batch}: {type(e).__name__}: {msg}")
                rows.append({"model": spec.name, "batch": batch, "precision": precision, "error": msg})
        del model
    peaks.finish(rows)
    print_table(FORWARD_COLUMNS, rows)

    e2e = []
    if args.slices:
        print(f"\n(b) end to end: {args.slices} synthetic uint8 slices of {args.slice_size}x{args.slice_size}, "
              f"{spec.name} model (random weights), default tiling, tile batch {args.tile_batch}; "
              f"infer.py = unet.cli.infer.main (load checkpoint, read TIFF, tile, predict, write zlib mask TIFF) "
              f"vs predict_probabilities on the slices in memory")
        with tempfile.TemporaryDirectory(prefix="unet-infer-bench-") as tmp:
            for precision in precisions:
                print(f"  running end to end {precision} ...", file=sys.stderr, flush=True)
                e2e.append(end_to_end(spec, precision, args, Path(tmp)))
        print(f"# tile plan: {e2e[0]['tile_plan']}")
        print_table(E2E_COLUMNS, e2e)
        for row in e2e:
            if row["in_run_overhead_pct"] >= OVERHEAD_LIMIT_PCT:
                print(f"# WARNING: infer.py overhead {row['in_run_overhead_pct']:.1f} % ({row['precision']}) is over "
                      f"{OVERHEAD_LIMIT_PCT:g} %; rerun with --profile to see where the time goes"
                      + (" (--quick: tiny slices, fixed costs dominate)" if args.quick else ""))
        print("# overhead % = (infer.py wall - forward alone) / forward alone, two separate runs (noisy on a "
              "shared machine); in-run % = infer.py's time outside its tile forwards / its time inside them, "
              "same run (the figure held to < 10 %)")
    write_json(args.json, {"benchmark": "inference_throughput", "machine": machine_record(probe),
                           **peaks.record(), "forward": rows, "end_to_end": e2e})
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
