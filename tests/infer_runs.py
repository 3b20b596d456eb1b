"""infer.py run in-process as the block-wise and K-class tests run it (CPU, fp32, quiet), and a whole output read back."""
from pathlib import Path

import numpy as np

from unet.cli.commands import infer
from unet.io.volumes import open_volume


def run_infer(ckpt: Path, *argv) -> None:
    assert infer(["--ckpt", str(ckpt), *map(str, argv), "--device", "cpu", "--precision", "fp32",
                  "--no-progress"]) == 0


def read_volume(spec) -> np.ndarray:
    with open_volume(str(spec)) as vol:
        return vol.read()
