"""Every GPU row of issue 12 in one bounded run: each row in its own process and time limit, JSON after each.

    python benchmarks/gpu_check.py [--device auto] [--budget 420] [--out DIR] [--rows a,b] [--quick]

Rows, in order of importance (a row is skipped once less than 20 s of --budget is left; later rows still get
their turn if an earlier one fails or times out):
  train_eager, train_compile_step:default, forward_eager, forward_cuda_graph, infer_end_to_end,
  train_compile_step:reduce-overhead, forward_compile, train_py_benchmark, train_py_real_run,
  train_eager_fused, checkpoint_stall, train_compile_model, train_compile_step:max-autotune-no-cudagraphs
(see benchmarks/gpu_rows.py for what each measures; train_py_benchmark is ``train.py --benchmark --amp`` with
the real loader and default flags, train_py_real_run is 400 steps of train.py with ``--save-every 200
--evaluate-every 200`` and its logged images/s, checkpoint_stall is benchmarks/checkpoint_stall.py).
The results go to OUT/gpu_check.json, rewritten atomically after every row, so a run cut short keeps every
finished row. At the end: a table of all rows and the torch.profiler table of the top kernels of the fastest
training row. Exit status 1 if any row failed (the others still ran).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, write_json  # noqa: E402

# In order of what the issue asks first: train.py --benchmark with default flags (now a compiled step on CUDA,
# so its first step includes the compile) is the acceptance row and runs right after the eager baseline.
ROWS = [  # (name, seconds allowed on a GPU): cold compiles of the reference model take 30-90 s
    ("train_eager", 90), ("train_py_benchmark", 150), ("train_compile_step:default", 150), ("forward_eager", 60),
    ("forward_cuda_graph", 60), ("infer_end_to_end", 120), ("train_compile_step:reduce-overhead", 150),
    ("forward_compile", 120), ("train_py_real_run", 180), ("train_eager_fused", 60), ("checkpoint_stall", 60),
    ("train_compile_model", 120), ("train_compile_step:max-autotune-no-cudagraphs", 150),
]
MIN_LEFT_S = 20


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "npu", "cpu"))
    p.add_argument("--budget", type=float, default=420, help="seconds for all rows together")
    p.add_argument("--out", default=None, help="folder for gpu_check.json (default: a temporary folder)")
    p.add_argument("--rows", default=None, help="comma list of rows to run (default: all, in the order above)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny model and inputs (see gpu_rows.py)")
    return p


def row_command(name: str, args, workdir: Path, json_path: Path) -> list[str]:
    """The command of one row; its result lands in ``json_path``."""
    py, quick = sys.executable, ["--quick"] if args.quick else []
    if name == "checkpoint_stall":
        return [py, str(REPO / "benchmarks" / "checkpoint_stall.py"), "--device", args.device, "--dir", str(workdir),
                "--json", str(json_path), *quick]
    if name.startswith("train_py_"):
        model_dir = workdir / name
        small = ["--base-filters", "16", "--padding", "same", "--input-size", "64", "--batch-size", "2",
                 "--workers", "0"] if args.quick else ["--batch-size", "8"]
        if name == "train_py_benchmark":
            steps = ["--benchmark", "--max-steps", "2" if args.quick else "50", "--warmup-steps", "1" if args.quick else "20"]
        else:
            steps = ["--fold", "0"] + (
                ["--max-steps", "4", "--save-every", "2", "--evaluate-every", "2", "--log-every", "1"] if args.quick
                else ["--max-steps", "400", "--save-every", "200", "--evaluate-every", "200", "--log-every", "20"])
        return [py, str(REPO / "train.py"), "--device", args.device, "--amp", "--amp-dtype", "bf16", *small, *steps,
                "--no-progress", "--overwrite", "--model-dir", str(model_dir)]
    profile = ["--profile"] if name.startswith("train_") else []
    return [py, str(REPO / "benchmarks" / "gpu_rows.py"), name, "--device", args.device, "--json", str(json_path),
            *profile, *quick]


def collect(name: str, workdir: Path, json_path: Path) -> dict:
    """The row's result: its JSON, or what train.py wrote."""
    if name == "train_py_benchmark":
        return json.loads((workdir / name / "benchmark.json").read_text())
    if name == "train_py_real_run":
        records = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines() if line]
        rates = sorted(r["images_per_s"] for r in records if r.get("kind") == "train" and r.get("images_per_s"))
        return {"logged_images_per_s": rates, "images_per_s": statistics.median(rates) if rates else None,
                "slowest_interval_images_per_s": rates[0] if rates else None,
                "note": "median of train.py's logged images/s per --log-every interval (validation excluded by "
                        "train.py, checkpoint saves included in the intervals that hold them)"}
    data = json.loads(json_path.read_text())
    return data["rows"][0] if "rows" in data else data


def run_row(name: str, limit: float, args, workdir: Path) -> dict:
    json_path = workdir / f"{name.replace(':', '_')}.json"
    cmd = row_command(name, args, workdir, json_path)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"### {name} (limit {limit:.0f} s)\n+ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-800:]
        return {"row": name, "error": f"timed out after {limit:.0f} s",
                "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail,
                "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"row": name, "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-1500:], "wall_s": wall}
    try:
        return {"row": name, **collect(name, workdir, json_path), "wall_s": wall}
    except (OSError, ValueError, KeyError) as e:
        return {"row": name, "error": f"no result: {type(e).__name__}: {e}", "wall_s": wall}


def summary_line(r: dict) -> str:
    if "error" in r or "skipped" in r:
        return f"{r['row']:<48} {r.get('error') or r.get('skipped')}"
    if r["row"] == "infer_end_to_end":
        return (f"{r['row']:<48} start-up {r['startup_s']:.2f} s; {r['slices'] - 1} slices {r['streaming_s']:.2f} s "
                f"vs forward-only {r['forward_only_s'] * (r['slices'] - 1) / r['slices']:.2f} s = "
                f"{r['ratio_streaming_vs_forward']:.2f}x")
    if r["row"] == "checkpoint_stall":
        return (f"{r['row']:<48} loop blocked: sync {r['sync_s'] * 1e3:.0f} ms, background "
                f"{r['background_blocked_s'] * 1e3:.0f} ms (on disk after {r['background_to_disk_s'] * 1e3:.0f} ms)")
    ips = r.get("images_per_s")
    mfu = f"  MFU {r['mfu']:.1%}" if r.get("mfu") else ""
    first = f"  first call {r['first_call_s']:.1f} s" if "first_call_s" in r else ""
    return f"{r['row']:<48} {ips:9.1f} images/s{mfu}{first}" if ips else f"{r['row']:<48} (no images/s)"


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    names = [n for n, _ in ROWS] if not args.rows else [n.strip() for n in args.rows.split(",") if n.strip()]
    limits = dict(ROWS)
    unknown = [n for n in names if n not in limits]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; choose from {', '.join(limits)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="unet-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    # Compiled graphs are cached here, so a rerun on the same machine skips most of the compile time.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "unet-inductor-cache"))
    results = {"benchmark": "gpu_check", "device": args.device, "quick": args.quick, "budget_s": args.budget,
               "inductor_cache": os.environ["TORCHINDUCTOR_CACHE_DIR"], "rows": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unet-gpu-rows-") as tmp:
        for name in names:
            left = args.budget - (time.perf_counter() - start)
            row = ({"row": name, "skipped": f"time budget spent ({left:.0f} s left)"} if left < MIN_LEFT_S
                   else run_row(name, min(limits[name] * (3 if args.quick else 1), left), args, Path(tmp)))
            results["rows"].append(row)
            print(summary_line(row), flush=True)
            write_json(out / "gpu_check.json", results)
    print(f"\n### all rows in {time.perf_counter() - start:.0f} s of a {args.budget:.0f} s budget")
    for r in results["rows"]:
        print(summary_line(r))
    trained = [r for r in results["rows"] if r["row"].startswith("train_") and r.get("kernels")]
    if trained:
        best = max(trained, key=lambda r: r["images_per_s"])
        print(f"\n### top kernels of the fastest training row, {best['row']} ({best['images_per_s']:.1f} images/s), "
              f"{best['kernels']['steps']} steps:\n{best['kernels']['table']}")
    return 1 if any("error" in r for r in results["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
