"""End-to-end runs in real processes: torchrun with 2 CPU ranks (gloo), SIGKILL during writes, elastic restarts."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unet.checkpoint import load_checkpoint
from torchrun_workers import worker_pid

REPO = Path(__file__).resolve().parents[1]
TINY = ["--base-filters", "4", "--depth", "3", "--padding", "same", "--input-size", "64", "--batch-size", "2",
        "--workers", "0", "--no-progress", "--device", "cpu"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args, nproc=2, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
            str(REPO / "train.py"), *TINY, *args]


@pytest.mark.slow
def test_torchrun_two_ranks_agree_and_match_single_process_evaluation(tmp_path):
    model_dir = tmp_path / "run"
    proc = subprocess.run(torchrun("--max-steps", "4", "--fold", "0", "--log-every", "2", "--model-dir",
                                   str(model_dir)), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 prints: the banner appears once, with the global batch.
    assert proc.stdout.count("unet-train:") == 1
    assert "global batch 4 = 2 per device x 2" in proc.stdout
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["weights_identical_across_ranks"] is True
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]  # written once, by rank 0
    assert sorted(p.name for p in model_dir.iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl",
                                                           "summary.json", "tensorboard"]
    assert len(list((model_dir / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    logged = [r for r in records if r["kind"] == "val"][-1]["val"]
    out = tmp_path / "eval.json"
    ev = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--ckpt", str(model_dir / "last.pt"),
                         "--device", "cpu", "--precision", "fp32", "--output", str(out)],  # training validates in fp32
                        env=ENV, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    single = json.loads(out.read_text())["metrics"]
    for key in ("dice_nvidia", "dice_mean", "iou_mean", "pixel_error", "v_rand", "v_info", "num_images"):
        assert single[key] == pytest.approx(logged[key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_never_leaves_a_corrupt_last_pt(tmp_path):
    model_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, "--max-steps", "100000", "--save-every", "1",
           "--log-every", "1000", "--model-dir", str(model_dir)]
    last = model_dir / "last.pt"
    rng = random.Random(0)
    step = 0
    for attempt in range(4):
        before = _file_id(last)
        err = tmp_path / f"attempt{attempt}.err"
        with open(err, "w") as f:
            proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=f)
        try:
            # Wait for this attempt's own first write (last.pt exists from attempt 2 on), so the kill lands
            # in the stream of writes (one every step), not in start-up.
            deadline = time.time() + 120
            while _file_id(last) == before and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, err.read_text()[-3000:]
            assert _file_id(last) != before, f"attempt {attempt} wrote no checkpoint in 120 s"
            time.sleep(rng.uniform(0.2, 1.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        ckpt = load_checkpoint(last)  # raises if truncated or corrupt
        # Each attempt resumed where the previous one stopped and saved at least one later step.
        assert ckpt["step"] > step, (attempt, ckpt["step"], step)
        step = ckpt["step"]
        assert all(v.isfinite().all() for v in ckpt["model"].values() if v.is_floating_point())
    leftovers = [p.name for p in model_dir.iterdir() if p.name not in ("last.pt", "tensorboard")]
    assert all(p.startswith(".last.pt.") and p.endswith(".tmp.pt") for p in leftovers), leftovers
    assert len(leftovers) <= 4  # a killed write may leave its temporary file, never a bad last.pt


@pytest.mark.slow
def test_sigkill_during_a_background_checkpoint_write_leaves_a_last_pt_that_loads_and_resumes(tmp_path):
    # train.py writes last.pt on rank 0's background thread; saving every step keeps a write in flight almost
    # always. The kill is sent the moment a write's hidden temporary file appears (the write is under way).
    model_dir = tmp_path / "run"
    last = model_dir / "last.pt"
    base = [sys.executable, str(REPO / "train.py"), *TINY, "--base-filters", "16", "--save-every", "1",
            "--log-every", "1000", "--model-dir", str(model_dir)]
    step, mid_write = 0, 0
    for attempt in range(3):
        before = _file_id(last)
        stale = set(model_dir.glob(".last.pt.*.tmp.pt")) if model_dir.exists() else set()
        err = tmp_path / f"attempt{attempt}.err"
        with open(err, "w") as f:
            proc = subprocess.Popen([*base, "--max-steps", "100000"], env=ENV, stdout=subprocess.DEVNULL, stderr=f)
        try:
            deadline, writing = time.time() + 120, set()
            while proc.poll() is None and time.time() < deadline and not writing:
                if _file_id(last) != before:  # this attempt's own first write landed: now catch a later one
                    writing = set(model_dir.glob(".last.pt.*.tmp.pt")) - stale
                time.sleep(0.001)
            assert proc.poll() is None, err.read_text()[-3000:]
            assert writing, f"attempt {attempt}: no background write seen in 120 s"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        mid_write += any(p.exists() for p in writing)  # the temporary outlived the process: killed mid-write
        ckpt = load_checkpoint(last)  # whole: the killed write never touched last.pt
        assert ckpt["step"] > step and all(v.isfinite().all() for v in ckpt["model"].values())
        step = ckpt["step"]
    assert mid_write >= 1, "no kill landed inside a write"
    done = subprocess.run([*base, "--max-steps", str(step + 3)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {last} at step {step}" in done.stdout
    assert load_checkpoint(last)["step"] == step + 3
    assert not list(model_dir.glob(".last.pt.*.tmp.pt"))  # the next writes removed the killed ones' temporaries


@pytest.mark.slow
def test_elastic_restart_resumes_from_last_checkpoint(tmp_path):
    model_dir = tmp_path / "run"
    cmd = torchrun("--max-steps", "40", "--save-every", "5", "--log-every", "5", "--model-dir", str(model_dir),
                   extra=["--max-restarts=1"])
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if (model_dir / "last.pt").exists() and load_checkpoint(model_dir / "last.pt")["step"] >= 10:
            break
        time.sleep(0.2)
    victim = worker_pid(proc.pid, rank="1")
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming" in out and "at step" in out
    ckpt = load_checkpoint(model_dir / "last.pt")
    assert ckpt["step"] == 40
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no step logged twice after the restart


def _file_id(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of ``path``, None while it is missing: changes with every atomic rewrite."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns
