"""The benchmark scripts run end to end with --quick settings and print/write what the docs promise.

Only structure is checked (columns, positive rates), never timings: CI machines are shared and noisy.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each runs a benchmark script in a subprocess

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def run(args, tmp_path, timeout=300, env=None):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=full_env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout


def table_rows(out: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the text table whose header line starts with ``header_start``."""
    lines = out.splitlines()
    i = next(k for k, line in enumerate(lines) if line.split()[:1] == [header_start])
    rows = []
    for line in lines[i + 1:]:
        if not line.strip() or line.startswith("#"):
            break
        rows.append(line.split())
    return lines[i], rows


def test_train_throughput_quick(tmp_path):
    out = run([sys.executable, str(BENCH / "train_throughput.py"), "--quick", "--device", "cpu",
               "--precisions", "fp32,fp16", "--threads", "1", "--json", str(tmp_path / "t.json")], tmp_path)
    assert re.search(r"^# train throughput .* cpu: .* cores: \d+ .* torch \S+", out, flags=re.M)
    assert "fp16 skipped" in out and re.search(r"MFU peak .* fp32 [\d.]+ / [\d.]+ TFLOP/s", out)
    # The theoretical ceiling is printed beside the measured peak (cores x GHz x FLOP/cycle), never used for MFU.
    assert re.search(r"CPU theoretical peak: \d+ cores x [\d.]+ GHz x \d+ FLOP/cycle", out)
    assert re.search(r"theoretical fp32 [\d.]+ TFLOP/s \(measured \d+%\)", out)
    header, rows = table_rows(out, "model")
    for title in ("batch", "prec", "compile", "layout", "images/s", "step ms", "peak MB", "GFLOP/img",
                  "TFLOP/s", "MFU"):
        assert title in header
    assert len(rows) == 1 and rows[0][:5] == ["small", "2", "fp32", "off", "channels_last"]
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["machine"]["device_type"] == "cpu"
    (row,) = data["rows"]
    assert row["images_per_s"] > 0 and row["gflop_per_image"] > 0 and row["mfu"] > 0
    assert row["peak_memory_mb"] > 0 and row["peak_source"] == "measured fp32 matmul/conv3x3 max"
    assert row["peak_tflops"] == pytest.approx(data["cpu_peaks_tflops"]["fp32"])
    assert sorted(data["cpu_peak_kernels"]["fp32"]) == ["conv3x3_tflops", "matmul_tflops"]
    assert data["cpu_theoretical_peak_tflops"]["fp32"] > 0


def test_inference_throughput_quick(tmp_path):
    scratch = tmp_path / "scratch"  # the script's TemporaryDirectory goes here, so its removal is checked
    scratch.mkdir()
    # torch makes its inductor cache dir under TMPDIR too (FlopCounterMode does); not the script's to remove.
    env = {"TMPDIR": str(scratch), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    out = run([sys.executable, str(BENCH / "inference_throughput.py"), "--quick", "--device", "cpu",
               "--threads", "1", "--peak-seconds", "1", "--json", str(tmp_path / "i.json")], tmp_path, env=env)
    header, rows = table_rows(out, "model")
    assert "images/s" in header and "ms/batch" in header and "MFU" in header
    assert [r[2] for r in rows] == ["1", "2"]
    header, rows = table_rows(out, "prec")
    for title in ("forward s", "infer.py s", "fwd slices/s", "infer slices/s", "overhead %", "in-run %"):
        assert title in header
    assert len(rows) == 1 and rows[0][:2] == ["fp32", "3"]
    data = json.loads((tmp_path / "i.json").read_text())
    assert all(r["images_per_s"] > 0 for r in data["forward"])
    (e2e,) = data["end_to_end"]
    assert e2e["forward_s"] > 0 and 0 < e2e["infer_predict_s"] <= e2e["infer_s"]
    assert e2e["tiling"] == "1x64"
    assert e2e["infer_s"] > 0  # (b) ran, so its stack, checkpoint and masks were written under TMPDIR ...
    assert not list(scratch.iterdir())  # ... in a temporary folder that is removed
    assert not list(tmp_path.glob("*.tif"))  # and nothing landed in the working directory


@pytest.mark.slow
def test_ddp_scaling_quick(tmp_path):
    out = run([sys.executable, str(BENCH / "ddp_scaling.py"), "--quick", "--cores", "2",
               "--json", str(tmp_path / "d.json")], tmp_path)
    assert "OMP_NUM_THREADS=" in out and re.search(r"scaling efficiency 2 vs 1 process: [\d.]+", out)
    header, rows = table_rows(out, "procs")
    assert "images/s" in header and "OMP" in header
    assert [(r[0], r[1], r[2]) for r in rows] == [("1", "2", "2"), ("2", "1", "2")]
    data = json.loads((tmp_path / "d.json").read_text())
    assert [r["processes"] for r in data["rows"]] == [1, 2]
    assert all(r["images_per_s"] > 0 for r in data["rows"])
    assert [r["omp_threads"] for r in data["rows"]] == [2, 1]  # cores split between processes


def test_gpu_check_rows_quick_on_cpu(tmp_path):
    """The GPU check's CPU-runnable rows (compiled ones through dynamo's eager backend), one process each."""
    out_dir = tmp_path / "out"
    rows = "train_eager,train_compile_step:reduce-overhead,forward_eager,forward_cuda_graph,checkpoint_stall"
    out = run([sys.executable, str(BENCH / "gpu_check.py"), "--quick", "--device", "cpu", "--out", str(out_dir),
               "--rows", rows], tmp_path, timeout=600, env={"OMP_NUM_THREADS": "1"})
    data = json.loads((out_dir / "gpu_check.json").read_text())
    by_row = {r["row"]: r for r in data["rows"]}
    assert list(by_row) == rows.split(",") and not any("error" in r for r in data["rows"]), data["rows"]
    for name in ("train_eager", "train_compile_step:reduce-overhead", "forward_eager"):
        r = by_row[name]
        assert r["images_per_s"] > 0 and r["first_call_s"] > 0 and r["model"] == "small" and r["precision"] == "bf16"
    assert by_row["train_eager"]["batch"] == 2 and by_row["forward_eager"]["batch"] == 2
    # a training row carries its profiler table; the fastest one's is printed at the end
    assert by_row["train_eager"]["kernels"]["top"] and "Self CPU" in by_row["train_eager"]["kernels"]["table"]
    assert re.search(r"### top kernels of the fastest training row, train_\S+ \([\d.]+ images/s\)", out)
    assert by_row["forward_cuda_graph"]["skipped"] == "CUDA graphs need a CUDA device, this is cpu"
    stall = by_row["checkpoint_stall"]
    assert stall["sync_s"] > 0 and 0 < stall["background_blocked_s"] <= stall["background_to_disk_s"]
    assert re.search(r"^checkpoint_stall +loop blocked: sync \d+ ms, background \d+ ms", out, flags=re.M)


def test_gpu_check_refuses_unknown_rows(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--rows", "train_eager,bogus", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0 and "unknown row(s) ['bogus']" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_cpu_profile_quick(tmp_path):
    out = run([sys.executable, str(BENCH / "cpu_profile.py"), "--quick", "--precisions", "fp32", "--threads", "1",
               "--json", str(tmp_path / "p.json")], tmp_path)
    assert re.search(r"CPU theoretical peak: \d+ cores", out)
    assert re.search(r"fp32 training step, skip crop before -> after .*: [\d.]+ s -> [\d.]+ s, [\d.]+x", out)
    assert re.search(r"fp32 first skip level alone .*: \d+ ms -> \d+ ms, [\d.]+x", out)
    (row,) = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert row["crop_level0"]["skip_shape"] == [2, 16, 64, 64] and row["crop_level0"]["after_s"] > 0
    layers = row["train"]["layers"]
    assert layers and all(r["gflop"] > 0 and r["tflops"] > 0 for r in layers)  # every conv layer gets its FLOPs
    assert {r["op"] for r in layers} <= {"conv2d", "conv_transpose2d", "convolution_backward"}
    assert 0 < row["train"]["conv_share"] < 1 and row["forward"]["others"]


@pytest.mark.slow
def test_gpu_check_quick(tmp_path):
    """The whole script, every row, as a lent GPU runs it (--quick settings on the CPU)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run(["bash", str(BENCH / "gpu_check.sh")], tmp_path, timeout=900,
        env={"QUICK": "1", "DEVICE": "cpu", "OUT": str(out_dir), "BUDGET_S": "800"})
    log = (out_dir / "gpu_check.log").read_text()
    assert "torch " in log and "### gpu_check.py exit 0" in log
    rows = {r["row"]: r for r in json.loads((out_dir / "gpu_check.json").read_text())["rows"]}
    assert not [r for r in rows.values() if "error" in r or ("skipped" in r and r["row"] != "forward_cuda_graph")]
    assert rows["train_py_benchmark"]["images_per_s"] > 0 and rows["train_py_benchmark"]["amp"] == "bf16"
    assert rows["train_py_real_run"]["images_per_s"] > 0
    e2e = rows["infer_end_to_end"]
    assert e2e["slices"] == 3 and e2e["startup_s"] > 0 and e2e["forward_only_s"] > 0


def test_train_vs_plain_quick(tmp_path):
    out = run([sys.executable, str(BENCH / "train_vs_plain.py"), "--quick", "--json", str(tmp_path / "t.json")],
              tmp_path)
    assert re.search(r"^# train.py vs plain UNet .* cpu: .* cores: \d+", out, flags=re.M)
    assert re.search(r"fp32  train.py --workers default: [\d.]+ img/s   plain UNet: [\d.]+ img/s   ratio [\d.]+x", out)
    assert "0 loader worker(s)" in out  # train.py's own CPU default, as it said it
    (row,) = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert row["ratio"] == pytest.approx(row["train_py_images_per_s"] / row["plain_images_per_s"])


def test_infer_defaults_small(tmp_path):
    out = run([sys.executable, str(BENCH / "infer_defaults.py"), "--parts", "slices", "--sizes", "300",
               "--json", str(tmp_path / "d.json")], tmp_path)
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["old default (--tile-plan flops)",
                                            "--tile-plan flops --memory-budget-mb 500", "default (--tile-plan speed)"]
    assert all(r["slices"] == 1 and r["peak_rss_mb"] > 0 and r["stream_s"] > 0 for r in rows)
    assert "fewest FLOPs" in rows[0]["plan"] and "fewest FLOPs" not in rows[2]["plan"]
    assert "300x300" in out


def test_large_volume_quick(tmp_path):
    out = run([sys.executable, str(BENCH / "large_volume.py"), "--quick", "--work", str(tmp_path / "lv"),
               "--block-io", "auto,threads", "--json", str(tmp_path / "lv.json")], tmp_path, timeout=600)
    rows = json.loads((tmp_path / "lv.json").read_text())["rows"]
    throughput = [r for r in rows if r["part"] == "throughput"]
    assert [(r["format"], r["block_io"]) for r in throughput] == [("OME-Zarr", "auto"), ("OME-Zarr", "threads"),
                                                                   ("HDF5", "auto")]
    assert all(r["blocks"] == 2 * 4 and r["forwards"] > 0 and r["ratio"] > 0 for r in throughput)
    assert [r["size"] for r in rows if r["part"] == "memory"] == [512, 1024]
    assert [r["nproc"] for r in rows if r["part"] == "ranks"] == [1, 2]
    assert all(r["peak_rss_mb"] > 0 for r in rows)
    assert "peak RSS 1024^2 / 512^2 = " in out
