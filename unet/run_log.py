"""A training run's record on disk: metrics.jsonl, summary.json and curves.png (rank 0 only)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from unet.atomic import atomic_write


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
    """Appends one JSON object per line to ``metrics.jsonl``; keeps lines past ``max_step`` out on resume."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            # Lines logged after the checkpoint we resume from belong to steps that will be redone.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write(self.path, lambda f: f.write("".join(k + "\n" for k in kept).encode()))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(jsonable(record)) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


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
