"""The processes torchrun starts, for tests that kill one of its workers (train.py's elastic restart, infer.py's
rank death)."""
import time
from pathlib import Path


def worker_pid(agent_pid: int, rank: str) -> int:
    """PID of the torchrun worker with RANK=rank, found through /proc (Linux)."""
    for _ in range(100):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
                stat = (entry / "stat").read_text().split()
            except OSError:
                continue
            if int(stat[3]) == agent_pid and f"RANK={rank}".encode() in env:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError("no worker process found")
