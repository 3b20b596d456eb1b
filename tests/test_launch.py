"""The launch scripts run end to end (tiny model, synthetic data, CPU) so they cannot rot."""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TINY = ["--", "--base-filters", "4", "--depth", "3", "--input-size", "64", "--workers", "0", "--no-progress",
        "--device", "cpu"]


@pytest.mark.slow
def test_train_1p_all_folds_then_cross_validation_table(tmp_path):
    # (the CPU recipe's 50 warm-up steps need more than the 2 steps run here)
    proc = subprocess.run(["bash", "launch/train_1p.sh", "--fold", "all", "--model-dir", str(tmp_path), *TINY,
                           "--lr-warmup-steps", "0"],
                          cwd=REPO, env={**ENV, "STEPS": "2"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv.json", "fold0", "fold1", "fold2", "fold3", "fold4"]
    cv = json.loads((tmp_path / "cv.json").read_text())
    assert len(cv["runs"]) == 5 and "dice_nvidia" in cv["cv"]["mean"]
    assert cv["cv"]["markdown"].splitlines()[0] in proc.stdout  # the Markdown CV table is printed


@pytest.mark.slow
def test_benchmark_8p_with_two_cpu_processes(tmp_path):
    proc = subprocess.run(["bash", "launch/benchmark_8p.sh", "--nproc", "2", "--model-dir", str(tmp_path), *TINY],
                          cwd=REPO, env={**ENV, "STEPS": "2", "WARMUP": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for bs in (8, 16):
        result = json.loads((tmp_path / f"batch{bs}" / "benchmark.json").read_text())
        assert result["world_size"] == 2 and result["global_batch"] == 2 * bs and result["images_per_s"] > 0


def test_help_describes_usage():
    proc = subprocess.run(["bash", "launch/train_8p.sh", "--help"], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--data-dir" in proc.stdout and "torchrun" in proc.stdout
