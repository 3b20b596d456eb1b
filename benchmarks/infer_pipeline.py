"""infer.py end to end against the model's forward passes alone, side by side in one run.

    python benchmarks/infer_pipeline.py [--model small|reference] [--slices 100] [--slice-size 512]
        [--precision fp32|bf16|fp16] [--tile-batch N] [--device auto] [--per-slice] [--compile] [--json OUT]

A synthetic uint8 stack (--slices x --slice-size^2) is written to a temporary TIFF and a randomly initialised
model (seed 0) to a temporary checkpoint. Then, in this order:

1. forward only: the model's forward passes (eval, inference_mode, autocast, the device's layout) over
   exactly the tile batches infer.py runs for that stack (same tile size, same batch sizes, same count),
   inputs already on the device; one untimed warm-up pass first;
2. infer.py: ``unet.cli.infer.main`` as the command runs it (load the checkpoint, read the TIFF, tile,
   predict, stitch, write the zlib mask TIFF); its fixed start-up (checkpoint load, device set-up, warm-up
   forward) is reported apart from the streaming run;
3. forward only again, so that a load change on a shared machine shows as a difference between 1 and 3;
4. with --per-slice: today's per-slice path (one ``predict_probabilities`` per slice, slices in memory).

The ratio printed is infer.py's streaming seconds / the mean of the two forward-only figures.
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

from common import MODELS, device_for, machine_header, machine_record, write_json  # noqa: E402

from unet.cli import infer as inference  # noqa: E402
from unet.checkpoint import save_checkpoint  # noqa: E402
from unet.data.synthetic import make_synthetic_em  # noqa: E402
from unet.device import DEVICE_CHOICES  # noqa: E402
from unet.prediction.pipeline import StackPredictor  # noqa: E402
from unet.prediction.predictor import free_memory_budget_mb, predict_probabilities  # noqa: E402
from unet.prediction.tiling import TilingOptions  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=tuple(MODELS),
                   help="small: base 16 'same'; reference: UNet_Medical (valid, 64 filters)")
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--slice-size", type=int, default=512)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--tile-batch", type=int, default=TilingOptions.tile_batch, help="infer.py's --tile-batch")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--per-slice", action="store_true", help="also time today's per-slice predictor")
    p.add_argument("--compile", action="store_true", help="pass --compile to infer.py (forward only stays eager)")
    p.add_argument("--json", default=None, metavar="OUT")
    return p


def batch_shapes(model, dev, options: TilingOptions, slices: int, size: int) -> list[tuple[int, ...]]:
    """The input shapes of infer.py's forward passes on such a stack (tiles taken across slices)."""
    plan, batch = StackPredictor(model, dev, options).plan(size, size)
    total = slices * plan.num_tiles
    shape = (model.config.in_channels, plan.tile_size, plan.tile_size)
    return [(min(batch, total - i), *shape) for i in range(0, total, batch)]


def forward_only(model, dev, shapes: list[tuple[int, ...]]) -> float:
    """Seconds of the model's forward passes alone on random tiles of those shapes, already on the device."""
    inputs = {s: dev.to_device(torch.rand(s)) for s in set(shapes)}
    with torch.inference_mode():
        for s in inputs:  # warm-up: kernel choice, allocator
            with dev.autocast():
                model(inputs[s])
        dev.synchronize()
        start = time.perf_counter()
        for s in shapes:
            with dev.autocast():
                model(inputs[s])
        dev.synchronize()
    return time.perf_counter() - start


def per_slice(model, dev, pages: np.ndarray, options: TilingOptions) -> float:
    """Seconds of predict_probabilities slice by slice on the stack in memory (today's per-slice path)."""
    images = [torch.from_numpy(p[None].astype(np.float32) / 255) for p in pages]
    predict_probabilities(model, images[0], dev, options)
    dev.synchronize()
    start = time.perf_counter()
    for image in images:
        predict_probabilities(model, image, dev, options).cpu()
    return time.perf_counter() - start


def run_infer(ckpt: Path, stack: Path, out: Path, args) -> tuple[float, object]:
    argv = ["--ckpt", str(ckpt), "--input", str(stack), "--output", str(out), "--device", args.device,
            "--tile-batch", str(args.tile_batch), "--no-progress", "--overwrite"]
    argv += ["--amp", "--amp-dtype", args.precision] if args.precision != "fp32" else []
    argv += ["--compile"] if args.compile else []
    parsed = inference.get_args_parser().parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        start = time.perf_counter()
        result = inference.main(parsed)
        wall = time.perf_counter() - start
    return wall, result


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    dev = device_for(args.device, args.precision)
    print(machine_header("infer.py pipeline vs forward only", dev))
    spec = MODELS[args.model]
    torch.manual_seed(0)
    model = spec.build().eval()
    with tempfile.TemporaryDirectory(prefix="unet-infer-pipeline-") as tmp:
        tmp = Path(tmp)
        save_checkpoint(tmp / "model.pt", model)
        pages, _ = make_synthetic_em(args.slices, args.slice_size, args.slice_size, seed=0)
        tifffile.imwrite(tmp / "stack.tif", pages, photometric="minisblack")
        model = dev.prepare_model(model)
        options = TilingOptions(tile_batch=args.tile_batch, memory_budget_mb=free_memory_budget_mb(dev))
        shapes = batch_shapes(model, dev, options, args.slices, args.slice_size)
        plan, batch = StackPredictor(model, dev, options).plan(args.slice_size, args.slice_size)
        fwd1 = forward_only(model, dev, shapes)
        wall, result = run_infer(tmp / "model.pt", tmp / "stack.tif", tmp / "masks.tif", args)
        fwd2 = forward_only(model, dev, shapes)
        old = per_slice(model, dev, pages, options) if args.per_slice else None
    fwd = (fwd1 + fwd2) / 2
    row = {"model": args.model, "precision": args.precision, "slices": args.slices, "slice_size": args.slice_size,
           "tile_plan": str(plan), "tiles_per_forward": batch, "forwards": len(shapes),
           "forward_only_s": [round(fwd1, 3), round(fwd2, 3)], "infer_stream_s": round(result.seconds, 3),
           "infer_startup_s": round(result.startup_seconds, 3), "infer_warmup_s": round(result.warmup_seconds, 3),
           "infer_wall_s": round(wall, 3), "ratio": round(result.seconds / fwd, 3),
           "per_slice_s": None if old is None else round(old, 3), "compile": args.compile}
    print(f"# {args.slices} slices of {args.slice_size}x{args.slice_size}, {args.model} model, {args.precision}, "
          f"{plan}, {batch} tiles per forward, {len(shapes)} forwards")
    print(f"forward only      {fwd1:8.2f} s  (again after infer.py: {fwd2:.2f} s)")
    print(f"infer.py stream   {result.seconds:8.2f} s  = {row['ratio']:.3f} x forward only (mean of both)")
    print(f"infer.py fixed    {result.startup_seconds:8.2f} s start-up + {result.warmup_seconds:.2f} s warm-up; "
          f"wall {wall:.2f} s")
    if old is not None:
        print(f"per-slice path    {old:8.2f} s  (predict_probabilities per slice, in memory, no writing)")
    write_json(args.json, {"benchmark": "infer_pipeline", "machine": machine_record(dev), **row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
