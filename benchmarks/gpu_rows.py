"""One row of the GPU check (benchmarks/gpu_check.py runs each in its own process, with its own time limit).

    python benchmarks/gpu_rows.py ROW [--device auto] [--quick] [--json OUT] [--profile]

Rows (reference model, bf16 autocast, synthetic inputs already on the device unless said otherwise):
  train_eager            training step, batch 8: autocast forward, CE+Dice, backward, Adam (foreach: the
                         default before the compiled step)
  train_eager_fused      the same with Adam(fused=True) (train.py --no-compile on CUDA)
  train_compile_model    torch.compile(model) (the earlier --compile), Adam foreach
  train_compile_step:M   model + loss compiled as one function in mode M (default,
                         max-autotune-no-cudagraphs, reduce-overhead), Adam(fused=True): train.py's default
                         step on CUDA with --compile-mode M (unet.training.trainer.forward_loss_fn, uint8 labels)
  forward_eager          eval forward, batch 16, 572x572, inference_mode
  forward_compile        torch.compile(model) forward (default mode)
  forward_cuda_graph     the eager forward captured once in a CUDA graph and replayed (CUDA only)
  infer_end_to_end       infer.py (subprocess) on a synthetic 100-slice 512x512 uint8 stack vs the model's
                         forward over the same tiles in memory; start-up measured apart on a 1-slice stack
Each training/forward row reports images/s, ms per step, the first call's seconds (compile time for compiled
rows; cached across runs in TORCHINDUCTOR_CACHE_DIR), peak memory, TFLOP/s and MFU against the datasheet peak
(``unet.device.KNOWN_PEAK_FLOPS``). With --profile a training row also records a torch.profiler table of its
top kernels (CUDA kernels on a GPU, CPU ops on a CPU). --quick: the small model at 64x64, batch 2, 1 + 2
steps, 3 slices of 64x64, and compiled rows use torch.compile's "eager" backend (dynamo tracing only: the code
path without minutes of C++ compilation on a CPU).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import MODELS, QUICK_MODEL, REPO, device_for, machine_record, write_json  # noqa: E402

from unet.benchmarking import model_flops, time_steps  # noqa: E402
from unet.device import DEVICE_CHOICES  # noqa: E402
from unet.training.trainer import forward_loss_fn  # noqa: E402

TRAIN_ROWS = ("train_eager", "train_eager_fused", "train_compile_model", "train_compile_step")
FORWARD_ROWS = ("forward_eager", "forward_compile", "forward_cuda_graph")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("row", help="row name (see above); train_compile_step:MODE")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--forward-batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 20; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50; --quick 2)")
    p.add_argument("--slices", type=int, default=None, help="end-to-end stack depth (default 100; --quick 3)")
    p.add_argument("--tile-batch", type=int, default=4, help="infer.py --tile-batch, and the forward-only batch")
    p.add_argument("--profile", action="store_true", help="training rows: record the top kernels of 5 steps")
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--quick", action="store_true")
    return p


def timed(step, dev, warmup: int, steps: int) -> dict:
    """First call (compile) timed alone, the rest of the warm-up, then ``steps`` calls (unet's time_steps)."""
    t0 = time.perf_counter()
    step()
    dev.synchronize()
    first_s = time.perf_counter() - t0
    _, step_s = time_steps(step, max(warmup - 1, 0), steps, dev)
    return {"first_call_s": first_s, "step_s": step_s, "peak_memory_mb": dev.peak_memory_bytes() / 2 ** 20}


def compile_kwargs(mode: str, quick_cpu: bool) -> dict:
    # --quick on a CPU: dynamo's tracing without inductor's C++ build, which takes minutes on 2 cores.
    return {"backend": "eager"} if quick_cpu else {"mode": mode}


def train_step_fn(row: str, mode: str | None, model, dev, images, labels, quick_cpu: bool):
    """The step a training row times; every variant does forward, CE+Dice, backward and an Adam step."""
    fused = row in ("train_eager_fused", "train_compile_step")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-4,
                                 **({"fused": True} if fused else {"foreach": True}))
    net = torch.compile(model, **compile_kwargs("default", quick_cpu)) if row == "train_compile_model" else model

    forward_loss = forward_loss_fn(net, dev)  # the trainer's own function: autocast forward + fp32 CE+Dice
    loss_fn = torch.compile(forward_loss, **compile_kwargs(mode, quick_cpu)) if row == "train_compile_step" \
        else forward_loss
    mark_step = torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead" else (lambda: None)

    def step():
        mark_step()  # CUDA-graph trees: a new step, so last step's outputs may be overwritten
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(images, labels)
        loss.backward()
        optimizer.step()
    return step


def kernel_table(step, dev, steps: int = 5, rows: int = 15) -> dict:
    """torch.profiler's top kernels over ``steps`` steps (CUDA kernels on a GPU, CPU ops otherwise)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        dev.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort, row_limit=rows, max_name_column_width=70)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr, 0) for e in averages) or 1
    top = sorted(averages, key=lambda e: -getattr(e, attr, 0))[:rows]
    return {"sorted_by": sort, "steps": steps, "table": table,
            "top": [{"name": e.key, "calls": e.count, "self_ms": getattr(e, attr, 0) / 1e3 / steps,
                     "share": getattr(e, attr, 0) / total} for e in top]}


def train_row(row: str, mode: str | None, spec, dev, args) -> dict:
    torch.manual_seed(0)
    model = dev.prepare_model(spec.build()).train()
    size, out, batch = spec.input_size, model.output_size(spec.input_size), args.train_batch
    images = dev.to_device(torch.rand(batch, 1, size, size))
    labels = torch.randint(0, 2, (batch, out, out), device=dev.device, dtype=torch.uint8)  # as train.py's loader
    step = train_step_fn(row, mode, model, dev, images, labels, args.quick and dev.type == "cpu")
    result = timed(step, dev, args.warmup, args.steps)
    flops = model_flops(spec.build(), (1, 1, size, size)) * batch / result["step_s"]
    record = {"batch": batch, "images_per_s": batch / result["step_s"], "step_ms": result["step_s"] * 1e3,
              **result, **_mfu(dev, flops)}
    if args.profile:
        record["kernels"] = kernel_table(step, dev)
    return record


def forward_row(row: str, spec, dev, args) -> dict:
    if row == "forward_cuda_graph" and dev.type != "cuda":
        return {"skipped": f"CUDA graphs need a CUDA device, this is {dev.type}"}
    torch.manual_seed(0)
    model = dev.prepare_model(spec.build()).eval()
    size, batch = spec.input_size, args.forward_batch
    x = dev.to_device(torch.rand(batch, 1, size, size))
    quick_cpu = args.quick and dev.type == "cpu"
    net = torch.compile(model, **compile_kwargs("default", quick_cpu)) if row == "forward_compile" else model

    def forward():
        with torch.inference_mode(), dev.autocast():
            return net(x)
    run = cuda_graph(model, x, dev) if row == "forward_cuda_graph" else forward
    result = timed(run, dev, args.warmup, args.steps)
    flops = model_flops(spec.build(), (1, 1, size, size), backward=False) * batch / result["step_s"]
    return {"batch": batch, "images_per_s": batch / result["step_s"], "ms_per_batch": result["step_s"] * 1e3,
            **result, **_mfu(dev, flops)}


def cuda_graph(model, x, dev):
    """Capture the eager forward once (autocast without its weight cache, which a graph cannot keep)."""
    static_in = x.clone()

    def forward():
        with torch.inference_mode(), torch.autocast("cuda", dtype=dev.amp_dtype, cache_enabled=False):
            return model(static_in)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up off the capture: cuDNN picks its algorithms here
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward()
    reference = forward()
    graph.replay()
    torch.cuda.synchronize()
    if not torch.allclose(static_out.float(), reference.float(), rtol=1e-2, atol=1e-2):
        raise RuntimeError("CUDA graph replay differs from the eager forward")
    return graph.replay


def _mfu(dev, flops_per_s: float) -> dict:
    peak = dev.peak_flops("bf16")
    return {"achieved_tflops": flops_per_s / 1e12, "peak_tflops": peak / 1e12 if peak else None,
            "mfu": flops_per_s / peak if peak else None}


def end_to_end(spec, dev, args) -> dict:
    """infer.py on a synthetic stack (subprocess, as a user runs it) vs the model over the same tiles."""
    import tifffile
    from unet.checkpoint import save_checkpoint
    from unet.data.synthetic import make_synthetic_em
    from unet.prediction.predictor import tiling_plan
    size = 64 if args.quick else 512
    torch.manual_seed(0)
    model = spec.build()
    plan = tiling_plan(model, size, size)
    with tempfile.TemporaryDirectory(prefix="unet-gpu-check-") as tmp:
        tmp = Path(tmp)
        save_checkpoint(tmp / "model.pt", model)
        images, _ = make_synthetic_em(args.slices, size, size, seed=0)
        tifffile.imwrite(tmp / "stack.tif", images, photometric="minisblack")
        tifffile.imwrite(tmp / "one.tif", images[:1], photometric="minisblack")
        one_s = _run_infer(tmp / "model.pt", tmp / "one.tif", tmp / "one_masks.tif", args)
        all_s = _run_infer(tmp / "model.pt", tmp / "stack.tif", tmp / "masks.tif", args)
        if tifffile.TiffFile(tmp / "masks.tif").series[0].shape[0] != args.slices:
            raise RuntimeError("infer.py wrote the wrong number of mask pages")
    forward_s = _forward_only(model, dev, plan, args)
    streaming_s = all_s - one_s
    return {"slices": args.slices, "slice_size": size, "tiling": f"{plan['num_tiles']}x{plan['tile_size']}",
            "tile_batch": args.tile_batch, "infer_1_slice_s": one_s, "infer_all_s": all_s,
            "startup_s": one_s, "streaming_s": streaming_s, "forward_only_s": forward_s,
            "forward_only_per_slice_ms": forward_s / args.slices * 1e3,
            "ratio_streaming_vs_forward": streaming_s / (forward_s * (args.slices - 1) / args.slices),
            "note": f"start-up = a 1-slice run (process start, CUDA init, checkpoint load, warm-up, one slice); "
                    f"streaming = the {args.slices}-slice run minus it; forward-only = the model on the same "
                    "number of tiles of the same size at --tile-batch, inputs on the device"}


def _run_infer(ckpt: Path, stack: Path, out: Path, args) -> float:
    cmd = [sys.executable, str(REPO / "infer.py"), "--ckpt", str(ckpt), "--input", str(stack), "--output", str(out),
           "--device", args.device, "--amp", "--amp-dtype", "bf16", "--tile-batch", str(args.tile_batch),
           "--no-progress", "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"infer.py failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}")
    return seconds


def _forward_only(model, dev, plan: dict, args) -> float:
    model = dev.prepare_model(model).eval()
    tiles = args.slices * plan["num_tiles"]
    x = dev.to_device(torch.rand(args.tile_batch, 1, plan["tile_size"], plan["tile_size"]))
    with torch.inference_mode(), dev.autocast():
        model(x)  # warm-up: cuDNN's algorithm choice for this shape
        dev.synchronize()
        t0 = time.perf_counter()
        for _ in range(0, tiles, args.tile_batch):
            model(x)
        dev.synchronize()
    return time.perf_counter() - t0


def run_row(args) -> dict:
    name, _, mode = args.row.partition(":")
    spec = QUICK_MODEL if args.quick else MODELS["reference"]
    dev = device_for(args.device, "bf16")
    if name == "train_compile_step" and mode not in COMPILE_MODES:
        raise SystemExit(f"train_compile_step needs a mode, one of {', '.join(COMPILE_MODES)}")
    if name in TRAIN_ROWS:
        record = train_row(name, mode or None, spec, dev, args)
    elif name in FORWARD_ROWS:
        record = forward_row(name, spec, dev, args)
    elif name == "infer_end_to_end":
        record = end_to_end(spec, dev, args)
    else:
        raise SystemExit(f"unknown row {args.row!r}")
    return {"row": args.row, "model": spec.name, "input_size": spec.input_size, "precision": "bf16",
            "device": dev.name(), **record}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.train_batch, args.forward_batch = min(args.train_batch, 2), min(args.forward_batch, 2)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 20)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 50)
    args.slices = args.slices if args.slices is not None else (3 if args.quick else 100)
    record = run_row(args)
    record["machine"] = machine_record(device_for(args.device, "bf16"))
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
