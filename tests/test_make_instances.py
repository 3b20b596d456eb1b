"""scripts/make_instances.py: ISBI's binary labels -> one id per cell, which trains on exactly the binary labels."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from unet.data.labels import LabelOptions, label_target

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_instances.py"


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_isbi_cells_as_instances_give_back_the_binary_labels(isbi_dir, tmp_path):
    done = run_script("--labels", isbi_dir / "train-labels.tif", "--output", tmp_path / "inst.tif")
    assert done.returncode == 0, done.stderr
    binary = tifffile.imread(isbi_dir / "train-labels.tif")
    inst = tifffile.imread(tmp_path / "inst.tif")
    assert inst.shape == binary.shape and inst.dtype == np.uint16
    assert ((inst > 0) == (binary > 0)).all()  # every cell pixel has an id, every membrane pixel 0
    ids = np.unique(inst[inst > 0])
    assert ids[0] == 1 and ids[-1] == len(ids)  # consecutive, unique over the stack
    assert f"wrote {tmp_path / 'inst.tif'}: {len(ids)} cells in 30 slices (uint16)" in done.stdout
    assert not set(np.unique(inst[0])[1:]) & set(np.unique(inst[1])[1:])  # slices share no id
    for k in range(len(binary)):  # the training target of the instances is the binary target, pixel for pixel
        np.testing.assert_array_equal(label_target(inst[k], "inst.tif", LabelOptions(label_kind="instances")),
                                      label_target(binary[k], "labels.tif", LabelOptions()))


@pytest.mark.parametrize("labels, message", [
    (np.array([[[0, 3], [255, 0]]], np.uint8), "not binary labels (values [0, 3, 255]"),
])
def test_non_binary_labels_are_refused_in_one_line(tmp_path, labels, message):
    tifffile.imwrite(tmp_path / "l.tif", labels)
    done = run_script("--labels", tmp_path / "l.tif", "--output", tmp_path / "i.tif")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "i.tif").exists()
