"""Data-parallel scaling: train.py --benchmark under torchrun with 1 and N processes at the same global batch.

    python benchmarks/ddp_scaling.py [--nproc 2] [--global-batch 8] [--steps 5] [--warmup 2] [--device cpu] [--quick]

Each run is ``torchrun --standalone --nproc_per_node=P train.py --benchmark`` (small model: base 16, 'same',
256x256 crops, built-in synthetic data, 0 loader workers) with per-process batch = global batch / P, so every
run does the same work per step; its MODEL_DIR/benchmark.json gives images/s.

What "ideal" means: on CPU the processes share the same cores. OMP_NUM_THREADS is set to cores / P, so 1
process uses every core with intra-op threads and P processes use one share each; the total compute is the
same, so ideal is images/s(P) = images/s(1) (efficiency 1.0). Above 1.0 means process parallelism used the
cores better than intra-op threading; below 1.0 is the cost of gradient all-reduce (gloo) and duplicated work.
On P real accelerators ideal is P x images/s(1).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, csv_list, device_for, machine_header, machine_record, print_table, write_json  # noqa: E402

from unet.device import DEVICE_CHOICES, usable_cpus  # noqa: E402

COLUMNS = [("processes", "procs"), ("batch_per_process", "batch/proc"), ("global_batch", "global batch"),
           ("omp_threads", "OMP threads"), ("images_per_s", "images/s"), ("step_ms", "step ms"),
           ("speedup", "vs 1 proc"), ("ideal", "ideal")]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[3],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=lambda s: csv_list(s, int), default=[2],
                   help="process counts to compare with 1 (comma list)")
    p.add_argument("--global-batch", type=int, default=8, help="crops per step over all processes")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    p.add_argument("--input-size", type=int, default=256, help="training crop size ('same' model)")
    p.add_argument("--base-filters", type=int, default=16)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--augment", action="store_true", help="include augmentation (default off: model + all-reduce)")
    # No 'auto': what "ideal" means (shared cores or one device per process) depends on the device kind.
    p.add_argument("--device", default="cpu", choices=tuple(c for c in DEVICE_CHOICES if c != "auto"),
                   help="cpu: gloo, cores split between processes; cuda/npu: one device per process")
    p.add_argument("--cores", type=int, default=None,
                   help="cores to split between the processes (default: this process's CPU affinity)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per torchrun")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the rows to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: 64x64 crops, global batch 2, 1 + 1 steps")
    return p


def run_one(nproc: int, args, workdir: Path) -> dict:
    """One torchrun; returns its benchmark.json plus the thread setting used."""
    model_dir = workdir / f"nproc{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train.py"), "--benchmark", "--device", args.device,
           "--base-filters", str(args.base_filters), "--padding", "same", "--input-size", str(args.input_size),
           "--batch-size", str(args.global_batch // nproc), "--max-steps", str(args.steps),
           "--warmup-steps", str(args.warmup), "--workers", "0", "--no-progress", "--model-dir", str(model_dir),
           "--augment" if args.augment else "--no-augment"]
    if args.precision != "fp32":
        cmd += ["--amp", "--amp-dtype", args.precision]
    env = dict(os.environ)
    threads = max(1, args.cores // nproc) if args.device == "cpu" else int(env.get("OMP_NUM_THREADS", "1"))
    # torchrun would otherwise force 1 thread per process, which would starve the 1-process run.
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    print(f"# run: OMP_NUM_THREADS={threads} {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"torchrun with {nproc} process(es) failed (exit {proc.returncode}):\n{tail}")
    result = json.loads((model_dir / "benchmark.json").read_text())
    return {"processes": nproc, "batch_per_process": result["batch_per_device"],
            "global_batch": result["global_batch"], "omp_threads": threads, "images_per_s": result["images_per_s"],
            "step_ms": result["step_time_ms"], "wall_s": wall, "benchmark": result}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.input_size, args.global_batch, args.steps, args.warmup = 64, 2, 1, 1
        args.nproc = [2]
    args.cores = args.cores or usable_cpus()
    counts = [1] + [n for n in args.nproc if n != 1]
    # Checked before any run, so a bad --nproc does not cost a whole 1-process run first.
    if min(counts) < 1:
        raise SystemExit(f"--nproc must be >= 1, got {args.nproc}")
    bad = [n for n in counts if args.global_batch % n]
    if bad:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {', '.join(map(str, bad))} "
                         f"process(es)")
    probe = device_for(args.device, "fp32")
    print(machine_header("DDP scaling", probe))
    print(f"# train.py --benchmark under torchrun: small model (base {args.base_filters}, 'same', "
          f"{args.input_size}x{args.input_size}), {args.precision}, global batch {args.global_batch}, "
          f"{args.warmup} warmup + {args.steps} timed steps, augmentation {'on' if args.augment else 'off'}, "
          f"0 loader workers")
    rows = []
    with tempfile.TemporaryDirectory(prefix="unet-ddp-bench-") as tmp:
        for n in counts:
            rows.append(run_one(n, args, Path(tmp)))
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup"] = r["images_per_s"] / base
        # Shared cores: the same total compute, so 1.0 is ideal; separate devices would make it P.
        r["ideal"] = 1.0 if args.device == "cpu" else float(r["processes"])
        r["efficiency"] = r["speedup"] / r["ideal"]
    print()
    print_table(COLUMNS, rows)
    if args.device == "cpu":
        print(f"# ideal: the {args.cores} cores are shared, OMP_NUM_THREADS = cores / processes, so the same "
              f"global batch ideally runs at the 1-process rate (1.0); efficiency = images/s(P) / images/s(1). "
              f"On P separate devices ideal would be P.")
    for r in rows[1:]:
        print(f"# scaling efficiency {r['processes']} vs 1 process: {r['efficiency']:.2f} "
              f"(speed-up {r['speedup']:.2f}x, ideal {r['ideal']:.0f}x)")
    write_json(args.json, {"benchmark": "ddp_scaling", "machine": machine_record(probe), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
