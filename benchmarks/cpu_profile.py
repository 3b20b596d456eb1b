"""Layer-by-layer profile of one training step and one forward pass on the CPU (torch.profiler).

    python benchmarks/cpu_profile.py [--precisions fp32,bf16] [--batch 2] [--top 15] [--json OUT] [--quick]

For each precision: the reference model (572 -> 388, channels_last, as the device layer runs it on CPU) takes
one untimed training step; then --compare-steps steps alternate between the skip crop before (plain slice) and
after (layout-keeping backward, ``unet.model.crop_skip``) and their medians are compared; then one training
step (forward + CE+Dice + backward + Adam, as train.py's ``train_step``) and one eval forward pass are profiled.
Two tables per pass: convolution layers by inclusive time, with their FLOPs (from the recorded shapes),
achieved TFLOP/s and share of the best dense kernel (matmul or 3x3 conv, ``measure_cpu_kernels``) measured
right before and after the profiled passes (the better reading); and the other ops by self time. The CPU's
theoretical peak (cores x GHz x FLOP/cycle of its ISA) is printed beside the measured one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from common import (MODELS, QUICK_MODEL, csv_list, device_for, machine_header, machine_record,  # noqa: E402
                    write_json)

from unet.benchmarking import (PRECISION_DTYPES, cpu_theoretical_peak, measure_cpu_kernels,  # noqa: E402
                               model_flops)
from unet import model as model_module  # noqa: E402
from unet.training.trainer import train_step  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precisions", type=csv_list, default=["fp32", "bf16"], help="comma list of fp32, bf16")
    p.add_argument("--batch", type=int, default=2, help="images per step")
    p.add_argument("--top", type=int, default=15, help="rows per table")
    p.add_argument("--peak-seconds", type=float, default=2.0, help="seconds per dtype of the peak measurement")
    p.add_argument("--compare-steps", type=int, default=3,
                   help="training steps per variant for the skip-crop before/after timing (0 = skip it)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the tables to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: small model at 64x64, short peak")
    return p


def conv_flops(key: str, shapes: list, pad: int) -> float | None:
    """FLOPs of one call of a convolution op from its recorded input shapes (None for other ops).

    ``aten::conv2d`` [input, weight, ...]: 2 N Cout Cin k k Ho Wo, with ``pad`` the model's padding.
    ``aten::conv_transpose2d`` [input, weight (Cin, Cout, k, k), ...]: 2 N H W Cin Cout k k.
    ``aten::convolution_backward`` [grad_out, input, weight, ...]: the forward's FLOPs once for the weight
    gradient and once for the input gradient, which the first layer (1 input channel, no gradient) skips;
    transposed when the weight is (Cin, Cout, ...) and Cin != Cout (every transposed layer in a UNet).
    """
    if len(shapes) < 3 or len(shapes[1]) != 4:
        return None
    if key == "aten::conv2d":
        (n, cin, h, w), (cout, _, kh, kw) = shapes[0], shapes[1]
        return 2 * n * cout * cin * kh * kw * (h - kh + 1 + 2 * pad) * (w - kw + 1 + 2 * pad)
    if key == "aten::conv_transpose2d":
        (n, cin, h, w), (_, cout, kh, kw) = shapes[0], shapes[1]
        return 2 * n * h * w * cin * cout * kh * kw
    if key == "aten::convolution_backward" and len(shapes[2]) == 4:
        grad_out, inp, weight = shapes[0], shapes[1], shapes[2]
        passes = 1 if inp[1] == 1 else 2
        transposed = weight[0] == inp[1] and weight[1] == grad_out[1] and weight[0] != weight[1]
        spatial = inp[2] * inp[3] if transposed else grad_out[2] * grad_out[3]
        return passes * 2 * inp[0] * spatial * weight[0] * weight[1] * weight[2] * weight[3]
    return None


CONV_OPS = ("aten::conv2d", "aten::conv_transpose2d", "aten::convolution_backward")


def _outside_conv(event) -> bool:
    """Whether no enclosing op of ``event`` is a convolution (autocast re-dispatches conv2d inside conv2d)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in CONV_OPS:
            return False
        parent = parent.cpu_parent
    return True


def layer_tables(prof, total_us: float, peak_flops: float, pad: int, top: int) -> dict:
    """Convolution layers by inclusive time (with FLOP rates) and the other ops by self time.

    The three outermost convolution ops (forward, transposed forward, backward) are timed inclusively, so
    whatever backend runs below them (oneDNN, or the slow path for tiny channel counts, and autocast's inner
    re-dispatch) is inside their row; every other op outside them is timed by self time, so no time is counted
    twice. Rows are grouped by op and input shapes.
    """
    layers: dict[tuple, dict] = {}
    others: dict[tuple, dict] = {}
    for e in prof.events():
        if not _outside_conv(e):
            continue
        shapes = e.input_shapes or []
        if e.name in CONV_OPS:
            row = layers.setdefault((e.name, str(shapes)), {"op": e.name.replace("aten::", ""), "shapes": _shapes(shapes),
                                                            "calls": 0, "us": 0.0,
                                                            "flop": conv_flops(e.name, shapes, pad)})
            row["us"] += e.cpu_time_total
        elif "ProfilerStep" not in e.name and e.self_cpu_time_total > 0:
            row = others.setdefault((e.name, _shapes(shapes)), {"op": e.name.replace("aten::", ""),
                                                               "shapes": _shapes(shapes), "calls": 0, "us": 0.0,
                                                               "flop": None})
            row["us"] += e.self_cpu_time_total
        else:
            continue
        row["calls"] += 1
    for row in list(layers.values()) + list(others.values()):
        flop = row.pop("flop")
        us = row.pop("us")
        tflops = flop * row["calls"] / (us / 1e6) / 1e12 if flop and us > 0 else None
        row.update(ms=us / 1e3, share=us / total_us, gflop=flop * row["calls"] / 1e9 if flop else None, tflops=tflops,
                   of_peak=tflops * 1e12 / peak_flops if tflops else None)
    conv_ms = sum(r["ms"] for r in layers.values())
    conv_flop = sum(r["gflop"] or 0 for r in layers.values()) * 1e9
    conv_tflops = conv_flop / (conv_ms / 1e3) / 1e12 if conv_ms else None
    by_time = lambda rows: sorted(rows, key=lambda r: -r["ms"])[:top]  # noqa: E731
    return {"conv_ms": conv_ms, "conv_share": conv_ms * 1e3 / total_us, "conv_tflops": conv_tflops,
            "conv_of_peak": conv_tflops * 1e12 / peak_flops if conv_tflops else None,
            "layers": by_time(layers.values()), "others": by_time(others.values())}


def _shapes(shapes: list) -> str:
    """The tensor shapes of an op's inputs (the 4-D ones), short."""
    return " ".join("x".join(map(str, s)) for s in shapes if len(s) == 4)[:52]


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'op':<26} {'shapes':<52} {'calls':>5} {'ms':>8} {'% step':>7} {'GFLOP':>7} {'TFLOP/s':>8} {'% peak':>7}")
    for r in rows:
        fmt = lambda v, s: format(v, s) if v is not None else "-"  # noqa: E731
        print(f"{r['op'][:26]:<26} {r['shapes']:<52} {r['calls']:>5} {r['ms']:>8.1f} {r['share']:>7.1%} "
              f"{fmt(r['gflop'], '.1f'):>7} {fmt(r['tflops'], '.3f'):>8} {fmt(r['of_peak'], '.0%'):>7}")


def profile_precision(spec, precision: str, args) -> dict:
    """Profile one training step and one eval forward of ``spec`` at ``precision``; time the crop variants."""
    dev = device_for("cpu", precision)
    torch.manual_seed(0)
    model = dev.prepare_model(spec.build()).train()
    size, out = spec.input_size, model.output_size(spec.input_size)
    pad = 0 if model.padding == "valid" else 1
    images = dev.to_device(torch.rand(args.batch, 1, size, size))
    labels = torch.randint(0, 2, (args.batch, out, out))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-4)
    scaler = dev.grad_scaler()

    def measure_peak() -> dict[str, float]:
        return measure_cpu_kernels(PRECISION_DTYPES[precision], args.peak_seconds, 1024 if args.quick else 2048,
                                   windows=3)

    def step():
        train_step(model, images, labels, optimizer, scaler, dev)
    step()  # warm-up: oneDNN primitives, allocator
    crop = compare_crop(step, args.compare_steps) if args.compare_steps else None
    level0 = crop_level0(spec, precision, args.batch, 3 if args.quick else 10)
    # The peak is measured right before and after the profiled passes and the better reading kept: on a shared
    # machine one reading can land in a busy moment, and a low peak would flatter every layer's share of it.
    before = measure_peak()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    step_us = sum(e.self_cpu_time_total for e in prof.key_averages())
    flops = model_flops(spec.build(), (1, 1, size, size)) * args.batch
    model.eval()
    with torch.inference_mode(), dev.autocast():
        model(images)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as fprof:
            model(images)
    fwd_us = sum(e.self_cpu_time_total for e in fprof.key_averages())
    fwd_flops = model_flops(spec.build(), (1, 1, size, size), backward=False) * args.batch
    after = measure_peak()
    kernels = {k: max(before[k], after[k]) for k in before}
    peak = max(kernels.values())
    return {"precision": precision, "batch": args.batch, "peak_kernels_tflops": {k: v / 1e12 for k, v in kernels.items()},
            "peak_readings_tflops": {"before": {k: v / 1e12 for k, v in before.items()},
                                     "after": {k: v / 1e12 for k, v in after.items()}},
            "crop_comparison": crop, "crop_level0": level0,
            "train": {"ms": step_us / 1e3, "tflops": flops / (step_us / 1e6) / 1e12,
                      "of_peak": flops / (step_us / 1e6) / peak, **layer_tables(prof, step_us, peak, pad, args.top)},
            "forward": {"ms": fwd_us / 1e3, "tflops": fwd_flops / (fwd_us / 1e6) / 1e12,
                        "of_peak": fwd_flops / (fwd_us / 1e6) / peak, **layer_tables(fprof, fwd_us, peak, pad, args.top)}}


def compare_crop(step, steps: int) -> dict:
    """Seconds per training step with the skip crop before (plain slice) and after (layout-keeping backward).

    The two alternate step by step on the same model (ABAB...), so load changes on a shared machine hit both
    alike; the medians and their ratio are returned.
    """
    variants = {"before": model_module.center_crop, "after": model_module.crop_skip}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(steps):
        for name, crop in variants.items():
            with mock.patch.object(model_module, "crop_skip", crop):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    return {"before_s": before, "after_s": after, "speedup": before / after, "steps_each": steps, "times": times}


def crop_level0(spec, precision: str, batch: int, reps: int) -> dict:
    """The first skip level alone, before vs after: forward + backward of pool(relu(skip)) and
    cat(up, crop(relu(skip))).

    ``relu(skip)`` stands for the first DoubleConv's output (``base_filters`` channels, channels_last), cropped to the last
    decoder level's input size as in the model. Alternating repetitions, medians: a few-percent change of a
    multi-second training step is below the noise of a shared machine; this isolates it.
    """
    model = spec.build()
    dtype, channels = PRECISION_DTYPES[precision], model.config.base_filters
    valid = model.padding == "valid"
    side = spec.input_size - 4 if valid else spec.input_size
    crop = model.output_size(spec.input_size) + 4 if valid else spec.input_size
    skip = torch.randn(batch, channels, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
    up = torch.randn(batch, channels, crop, crop, dtype=dtype).contiguous(memory_format=torch.channels_last)
    skip.requires_grad_()
    up.requires_grad_()
    grads = (torch.randn(batch, channels, side // 2, side // 2, dtype=dtype).contiguous(memory_format=torch.channels_last),
             torch.randn(batch, 2 * channels, crop, crop, dtype=dtype).contiguous(memory_format=torch.channels_last))

    def run(crop_fn):
        out = torch.relu(skip)  # not a leaf, as in the model: its two gradients meet in autograd's buffer
        pooled = torch.nn.functional.max_pool2d(out, 2)
        joined = torch.cat([up, crop_fn(out, crop, crop)], dim=1)
        torch.autograd.grad((pooled, joined), (skip, up), grads)
    variants = {"before": model_module.center_crop, "after": model_module.crop_skip}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, fn in variants.items():
        run(fn)  # warm-up
    for _ in range(reps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            run(fn)
            times[name].append(time.perf_counter() - t0)
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    return {"skip_shape": [batch, channels, side, side], "crop": crop, "before_s": before, "after_s": after,
            "speedup": before / after, "reps": reps}


def report(spec, r: dict, args) -> None:
    peak = max(r["peak_kernels_tflops"].values())
    kernels = ", ".join(f"{k} {v:.3f}" for k, v in r["peak_kernels_tflops"].items())
    if r["crop_comparison"]:
        c = r["crop_comparison"]
        print(f"\n# {r['precision']} training step, skip crop before -> after (median of {c['steps_each']} "
              f"alternating steps each): {c['before_s']:.2f} s -> {c['after_s']:.2f} s, {c['speedup']:.3f}x")
    c = r["crop_level0"]
    print(f"# {r['precision']} first skip level alone (pool + crop + cat, forward + backward, skip "
          f"{'x'.join(map(str, c['skip_shape']))} -> {c['crop']}), median of {c['reps']}: "
          f"{c['before_s'] * 1e3:.0f} ms -> {c['after_s'] * 1e3:.0f} ms, {c['speedup']:.2f}x")
    for part, label in (("train", "training step"), ("forward", "eval forward")):
        d = r[part]
        print(f"\n# {spec.name} batch {args.batch} {r['precision']} {label}: {d['ms']:.0f} ms profiled, "
              f"{d['tflops']:.3f} TFLOP/s = {d['of_peak']:.0%} of the best dense kernel ({peak:.3f} TFLOP/s: "
              f"{kernels}); convolutions {d['conv_share']:.0%} of the time at {d['conv_tflops'] or 0:.3f} TFLOP/s "
              f"({d['conv_of_peak'] or 0:.0%} of it), the rest {1 - d['conv_share']:.0%}")
        print_rows(f"convolution layers by inclusive time, {r['precision']} {label}", d["layers"])
        print_rows(f"other ops by self time, {r['precision']} {label}", d["others"])


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.peak_seconds, args.top = min(args.peak_seconds, 0.2), min(args.top, 8)
        args.compare_steps = min(args.compare_steps, 1)
    spec = QUICK_MODEL if args.quick else MODELS["reference"]
    probe = device_for("cpu", "fp32")
    print(machine_header("cpu profile", probe))
    theory = cpu_theoretical_peak()
    print(f"# {theory['description']}")
    results = []
    for precision in args.precisions:
        if precision not in ("fp32", "bf16"):
            raise SystemExit(f"--precisions: {precision!r} is not profiled on CPU; use fp32 and/or bf16")
        results.append(profile_precision(spec, precision, args))
        report(spec, results[-1], args)
    write_json(args.json, {"benchmark": "cpu_profile", "machine": machine_record(probe), "theoretical_peak": theory,
                           "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
