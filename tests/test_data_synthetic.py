"""The synthetic EM generator: deterministic, fast, and with labels that match what the image shows."""

import numpy as np
import pytest

from unet.data.datasets import synthetic_dataset
from unet.data.synthetic import make_synthetic_em
from unet.errors import UserError


def test_shapes_types_and_determinism():
    img, lab = make_synthetic_em(3, 64, 80, seed=5)
    assert img.shape == lab.shape == (3, 64, 80) and img.dtype == lab.dtype == np.uint8
    assert set(np.unique(lab).tolist()) == {0, 255}
    img2, lab2 = make_synthetic_em(3, 64, 80, seed=5)
    assert np.array_equal(img, img2) and np.array_equal(lab, lab2)
    img3, _ = make_synthetic_em(3, 64, 80, seed=6)
    assert not np.array_equal(img, img3)
    # Slice k depends only on (seed, k): a longer set extends a shorter one.
    longer, _ = make_synthetic_em(4, 64, 80, seed=5)
    assert np.array_equal(longer[:3], img)


def test_looks_like_em():
    img, lab = make_synthetic_em(4, 256, 256)
    membrane = lab == 0
    assert 0.08 < membrane.mean() < 0.3              # ISBI: about 22 % membrane
    assert img[membrane].mean() < img[~membrane].mean() - 50
    # Organelles: clearly darker pixels inside cells, labelled as cell interior.
    inside = img[~membrane].astype(float)
    assert (inside < img[membrane].mean() + 30).mean() > 0.005
    # Noise, blur and uneven illumination give a continuous range of grey values, not a few flat levels.
    assert len(np.unique(img)) > 100
    corr = np.corrcoef(img.ravel().astype(float), (~membrane).ravel().astype(float))[0, 1]
    assert corr > 0.5


def test_default_dataset():
    ds = synthetic_dataset()
    assert len(ds) == 30 and ds.source == "synthetic"
    assert ds.images[0].shape == (1, 256, 256) and ds.images[0].dtype == np.float32
    assert set(np.unique(ds.labels[0]).tolist()) == {0, 1}
    img, lab = make_synthetic_em(30, 256, 256, 0)
    np.testing.assert_array_equal(ds.labels[7], lab[7] // 255)
    np.testing.assert_allclose(ds.images[7][0], img[7] / 255, atol=1e-7)


def test_rejects_tiny():
    with pytest.raises(UserError, match=r"synthetic data needs count >= 1 and a size of at least 16x16"):
        make_synthetic_em(1, 8, 8)


def test_three_classes_label_the_organelles_of_the_same_images():
    images2, labels2 = make_synthetic_em(2, 96, 96, seed=3)
    images3, labels3 = make_synthetic_em(2, 96, 96, seed=3, classes=3)
    np.testing.assert_array_equal(images3, images2)
    assert set(np.unique(labels3)) == {0, 1, 2}
    np.testing.assert_array_equal(labels3 == 0, labels2 == 0)  # the membranes are the binary set's
    organelle = labels3 == 2
    # organelles are the darker blobs inside cells
    assert images3[organelle].mean() < images3[labels3 == 1].mean() - 20


def test_other_class_counts_are_refused():
    with pytest.raises(UserError, match="synthetic data has 2 classes .* or 3 .*, not 4"):
        make_synthetic_em(1, 32, 32, classes=4)


def test_make_synthetic_script_writes_images_and_labels(tmp_path):
    import subprocess
    import sys
    import tifffile
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic.py"
    done = subprocess.run([sys.executable, str(script), "--output", str(tmp_path / "s3"), "--count", "2",
                           "--size", "64", "--seed", "3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    images, labels = make_synthetic_em(2, 64, 64, seed=3, classes=3)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "s3" / "images.tif"), images)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "s3" / "labels.tif"), labels)
    assert "label shares 0:" in done.stdout


def test_neuropil_style_is_deterministic_and_labels_membranes():
    img, lab = make_synthetic_em(3, 72, 90, seed=4, style="neuropil")
    assert img.shape == lab.shape == (3, 72, 90) and img.dtype == lab.dtype == np.uint8
    assert set(np.unique(lab).tolist()) == {0, 255}
    again, lab_again = make_synthetic_em(3, 72, 90, seed=4, style="neuropil")
    assert np.array_equal(img, again) and np.array_equal(lab, lab_again)
    longer, _ = make_synthetic_em(4, 72, 90, seed=4, style="neuropil")
    assert np.array_equal(longer[:3], img)
    cells, _ = make_synthetic_em(3, 72, 90, seed=4)
    assert not np.array_equal(img, cells)
    tiny_img, tiny_lab = make_synthetic_em(1, 16, 16, style="neuropil")  # the smallest size still makes a slice
    assert tiny_img.shape == tiny_lab.shape == (1, 16, 16) and set(np.unique(tiny_lab)) <= {0, 255}


def test_neuropil_looks_like_isbi_neuropil():
    from scipy import ndimage as ndi
    img, lab = make_synthetic_em(4, 256, 256, seed=2, style="neuropil")
    membrane = lab == 0
    assert 0.18 < membrane.mean() < 0.30                # ISBI 2012: 24.6 % membrane
    assert img[membrane].mean() < img[~membrane].mean() - 40
    # Neurites of very different sizes side by side: the 90th percentile cell is several times the median one,
    # where the "cells" style's even Voronoi cells stay below three times it.
    def spread(labels):
        areas = np.concatenate([np.bincount(ndi.label(s != 0)[0].ravel())[1:] for s in labels])
        return np.percentile(areas, 90) / np.median(areas)
    assert spread(lab) > 4 > 3 > spread(make_synthetic_em(4, 256, 256, seed=2)[1])


def test_neuropil_mitochondria_are_dark_cell_interior():
    images, labels3 = make_synthetic_em(3, 256, 256, seed=5, style="neuropil", classes=3)
    _, labels2 = make_synthetic_em(3, 256, 256, seed=5, style="neuropil")
    np.testing.assert_array_equal(labels3 == 0, labels2 == 0)
    mito = labels3 == 2
    assert 0.005 < mito.mean() < 0.08
    assert (labels2[mito] == 255).all()                # labelled cell interior in the binary set, as in ISBI
    assert images[mito].mean() < images[labels3 == 1].mean() - 30


def test_unknown_style_is_refused():
    with pytest.raises(UserError, match="synthetic style must be one of cells, neuropil, not 'isbi'"):
        make_synthetic_em(1, 32, 32, style="isbi")


def test_make_synthetic_script_neuropil_style(tmp_path):
    import subprocess
    import sys
    import tifffile
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic.py"
    done = subprocess.run([sys.executable, str(script), "--output", str(tmp_path / "np"), "--count", "2",
                           "--size", "64", "--seed", "3", "--style", "neuropil", "--classes", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    images, labels = make_synthetic_em(2, 64, 64, seed=3, style="neuropil")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "np" / "images.tif"), images)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "np" / "labels.tif"), labels)
    assert "(neuropil)" in done.stdout
