"""infer.py run in-process as the block-wise and K-class tests run it (CPU, fp32, quiet), their synthetic OME-Zarr
input, and a whole output read back."""
from pathlib import Path

import numpy as np

from unet.cli.commands import infer
from unet.data.synthetic import make_synthetic_em
from unet.io.volume_writers import create_volume
from unet.io.volumes import open_volume


def run_infer(ckpt: Path, *argv) -> None:
    assert infer(["--ckpt", str(ckpt), *map(str, argv), "--device", "cpu", "--precision", "fp32",
                  "--no-progress"]) == 0


def read_volume(spec) -> np.ndarray:
    with open_volume(str(spec)) as vol:
        return vol.read()


def write_em_volume(path: Path, shape: tuple[int, int, int], seed: int = 5) -> np.ndarray:
    """The synthetic EM stack of ``shape`` written as an OME-Zarr of 16 x 16 chunks (several per slice); returned."""
    images, _ = make_synthetic_em(*shape, seed=seed)
    w = create_volume(str(path), images.shape, np.uint8, (1, 16, 16))
    w.write((0, 0, 0), images)
    w.commit()
    return images
