"""The loader benchmark runs end to end with tiny settings and prints every row of its table."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the loader benchmark in a subprocess

REPO = Path(__file__).resolve().parents[1]


def test_loader_benchmark_quick():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loader_throughput.py"), "--quick",
                           "--threads", "1"], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    rows = re.findall(r"^\s+(\d)\s+(on|off)\s+([\d.]+)$", out, flags=re.M)
    assert sorted((w, a) for w, a, _ in rows) == sorted((w, a) for w in "012" for a in ("on", "off"))
    assert all(float(r) > 0 for _, _, r in rows)
    assert "torchvision v2 chain" in out and "grid_sample one-shot, bicubic (chosen)" in out
    assert re.search(r"model: UNet .* [\d.]+ images/s", out)
