"""Scribble labels from dense ones (unet.data.scribbles, scripts/make_scribbles.py)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from unet.data.datasets import synthetic_dataset
from unet.data.scribbles import scribble_slice, scribble_stack

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dense():
    return np.stack(synthetic_dataset(count=3, size=192, seed=0).labels)  # {0 = membrane, 1 = cell}


def test_scribbles_keep_true_labels_on_at_most_the_fraction_and_both_classes(dense):
    sparse = scribble_stack(dense, 0.05, ignore=7, seed=0)
    assert sparse.shape == dense.shape and sparse.dtype == dense.dtype
    for s, d in zip(sparse, dense):
        kept = s != 7
        assert 0.03 < kept.mean() <= 0.05  # a ceiling, short of it by less than a stroke per class
        np.testing.assert_array_equal(s[kept], d[kept])  # only true labels survive
        for c in (0, 1):
            assert 0.01 < (s == c).mean() <= 0.025  # each class its even share
            # strokes, not scattered pixels: a few connected pieces, each of many pixels
            pieces = ndi.label(s == c)[1]
            assert 1 <= pieces <= 60 and (s == c).sum() / pieces > 20


def test_scribbles_are_reproducible_by_seed(dense):
    a, b, c = (scribble_stack(dense, 0.05, 7, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_class_smaller_than_its_share_is_kept_whole():
    labels = np.zeros((100, 100), np.uint8)
    labels[10:12, 10:20] = 1  # 20 pixels, under the 250 a class may keep at fraction 0.05
    sparse = scribble_slice(labels, 0.05, 9, np.random.default_rng(0))
    assert (sparse == 1).sum() == 20 and (sparse == 0).sum() <= 250


def test_bad_arguments_are_refused(dense):
    with pytest.raises(ValueError, match=r"ignore value 1 is one of the label values \[0, 1\]"):
        scribble_slice(dense[0], 0.05, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
        scribble_slice(dense[0], 0, 7, np.random.default_rng(0))


def test_make_scribbles_script_writes_the_stack(dense, tmp_path):
    tifffile.imwrite(tmp_path / "labels.tif", (dense * 255).astype(np.uint8), photometric="minisblack")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_scribbles.py"), "--labels",
                           str(tmp_path / "labels.tif"), "--output", str(tmp_path / "s.tif"), "--ignore", "128"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "train with --ignore-label 128" in done.stdout
    sparse = tifffile.imread(tmp_path / "s.tif")
    np.testing.assert_array_equal(sparse, scribble_stack((dense * 255).astype(np.uint8), 0.05, 128, seed=0))
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "make_scribbles.py"), "--labels",
                          str(tmp_path / "labels.tif"), "--output", str(tmp_path / "b.tif"), "--ignore", "255"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "ignore value 255 is one of the label values [0, 255]" in bad.stderr
    assert not (tmp_path / "b.tif").exists()


def test_make_scribbles_into_a_missing_folder_is_one_line(dense, tmp_path):
    tifffile.imwrite(tmp_path / "labels.tif", (dense * 255).astype(np.uint8), photometric="minisblack")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_scribbles.py"), "--labels",
                           str(tmp_path / "labels.tif"), "--output", str(tmp_path / "no" / "s.tif")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("make_scribbles.py: error: cannot write")
