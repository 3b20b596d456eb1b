"""A training run's record on disk: metrics.jsonl, summary.json and curves.png (rank 0 only)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from unet.atomic import atomic_write
from unet.errors import UserError


def jsonable(obj):
    """Plain JSON types with NaN/inf as null (strict JSON has no NaN), numpy scalars as Python numbers,
    dict keys as strings and anything else as its ``str``; every JSON file and line the package writes
    goes through it."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


class MetricsLog:
    """One JSON object per line in ``metrics.jsonl``; keeps lines past ``max_step`` out on resume.

    ``mirror``, when set, receives every record after it is written (TensorBoard's event files).

    Every write rewrites the whole file through :func:`unet.atomic.atomic_write` (temporary file + rename), so
    a crash or a failed write leaves the previous, whole lines: the file is small (a line per logged step) and
    written every ``--log-every`` steps. Files that earlier versions (which appended) left with a torn last
    line still resume: resuming drops that line (and says so) instead of refusing the run.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.mirror: Callable[[dict], None] | None = None
        if resume_step is not None and self.path.exists():
            records, torn = _parse(self.path)
            if torn:
                print(f"note: {self.path}: dropped a torn last line (the previous run stopped while writing it)",
                      file=sys.stderr)
            # Lines logged after the checkpoint we resume from belong to steps that will be redone.
            self._lines = [json.dumps(r) + "\n" for r in records if r.get("step", 0) <= resume_step]
            self._publish(self._lines)
        else:
            self._lines: list[str] = []
            if self.path.exists():  # resume_step None: a fresh run
                self.path.unlink()

    def write(self, record: dict) -> None:
        """Add ``record`` as one line; the file holds every line whole or, if this write fails, the old ones."""
        lines = self._lines + [json.dumps(jsonable(record)) + "\n"]
        self._publish(lines)
        self._lines = lines
        if self.mirror is not None:  # e.g. TensorBoard's event files, after the record of truth is on disk
            self.mirror(record)

    def _publish(self, lines: list[str]) -> None:
        atomic_write(self.path, lambda f: f.write("".join(lines).encode()))

    def read(self) -> list[dict]:
        """Every record, in order (a torn last line left out)."""
        return _parse(self.path)[0] if self.path.exists() else []


def _parse(path: Path) -> tuple[list[dict], bool]:
    """The records of a JSON-lines file and whether its last line was torn; a bad line elsewhere is refused."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise UserError(f"{path}: line {number} is not valid JSON; the log is damaged, "
                                f"repair or delete that line") from None
            torn = True
    return records, torn


def write_json(path: str | Path, obj: dict) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(jsonable(obj), indent=2) + "\n").encode()))


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> None:
    """Training loss and validation Dice against step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val"].get("dice_nvidia")) for r in records if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (CE + 1 - soft Dice)", color="tab:blue")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="tab:red", label="validation Dice (dice_nvidia)")
        ax2.set_ylabel("validation Dice", color="tab:red")
        ax2.set_ylim(min(0.5, min(v for _, v in val if v is not None) - 0.02), 1.0)
    ax.set_title(title)
    fig.tight_layout()

    def save(f):
        fig.savefig(f, format="png")

    atomic_write(path, save)
    plt.close(fig)
