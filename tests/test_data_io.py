"""Reading stacks and validating data sets: formats, the real ISBI stacks, and every bad-input message."""
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from unet.io.images import StackInfo, iter_pages, read_stack, scale_by_dtype, stack_info

from unet.data.datasets import SliceSet, load_dataset
from unet.errors import UserError


def _isbi_layout(tmp_path, images, labels=None):
    tifffile.imwrite(tmp_path / "train-volume.tif", images, photometric="minisblack")
    if labels is not None:
        tifffile.imwrite(tmp_path / "train-labels.tif", labels, photometric="minisblack")
    return tmp_path


def _stack(n=3, h=20, w=24, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
    lab = np.where(rng.random((n, h, w)) < 0.7, 255, 0).astype(np.uint8)
    return img, lab


# ------------------------------------------------------------------------------------------ scaling

def test_scale_by_dtype_values():
    assert scale_by_dtype(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
    np.testing.assert_allclose(scale_by_dtype(np.array([0, 65535, 32768], np.uint16)), [0, 1, 32768 / 65535])
    f = scale_by_dtype(np.array([0.25], np.float64))
    assert f.dtype == np.float32 and f.tolist() == [0.25]
    with pytest.raises(UserError, match=r"x.tif: pixel type int32 is not supported; save the images as uint8"):
        scale_by_dtype(np.zeros(3, np.int32), source="x.tif")


# ------------------------------------------------------------------------------------------ formats

def test_read_multipage_single_png_and_16bit(tmp_path):
    img, _ = _stack()
    tifffile.imwrite(tmp_path / "s.tif", img, photometric="minisblack")
    np.testing.assert_array_equal(read_stack(tmp_path / "s.tif"), img)
    tifffile.imwrite(tmp_path / "one.tiff", img[0])
    assert read_stack(tmp_path / "one.tiff").shape == (1, 20, 24)
    Image.fromarray(img[1]).save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_stack(tmp_path / "p.png"), img[1:2])
    deep = (img.astype(np.uint16) * 257)
    Image.fromarray(deep[2]).save(tmp_path / "d.png")
    got = read_stack(tmp_path / "d.png")
    assert got.dtype == np.uint16 and np.array_equal(got[0], deep[2])
    assert stack_info(tmp_path / "d.png") == StackInfo(tmp_path / "d.png", 1, 20, 24, 1, np.dtype(np.uint16))
    assert stack_info(tmp_path / "d.png").name == "d"


@pytest.mark.parametrize("mode, options", [("1", {}), ("L", {}), ("LA", {}), ("RGB", {}), ("RGBA", {}), ("P", {}),
                                           ("P", {"transparency": 0}), ("I;16", {})])
def test_png_stack_info_matches_read_stack_without_decoding(tmp_path, monkeypatch, mode, options):
    Image.new(mode, (9, 5)).save(tmp_path / "m.png", **options)
    got = read_stack(tmp_path / "m.png")
    want = StackInfo(tmp_path / "m.png", 1, 5, 9, got.shape[1] if got.ndim == 4 else 1, got.dtype)

    def no_decode(self):
        raise AssertionError("stack_info decoded the pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert stack_info(tmp_path / "m.png") == want


def test_imagej_hyperstack_and_ome(tmp_path):
    rng = np.random.default_rng(1)
    h = rng.integers(0, 65535, (3, 4, 2, 16, 12), dtype=np.uint16)  # T, Z, C, Y, X
    tifffile.imwrite(tmp_path / "hs.tif", h, imagej=True, metadata={"axes": "TZCYX"})
    got = read_stack(tmp_path / "hs.tif")
    np.testing.assert_array_equal(got, h.reshape(12, 2, 16, 12))
    assert stack_info(tmp_path / "hs.tif") == StackInfo(tmp_path / "hs.tif", 12, 16, 12, 2, np.dtype(np.uint16))
    chunks = list(iter_pages(tmp_path / "hs.tif", 5))
    assert [len(c) for c in chunks] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), got)

    tifffile.imwrite(tmp_path / "o.ome.tif", h[:, :, 0], ome=True, metadata={"axes": "TZYX"})
    np.testing.assert_array_equal(read_stack(tmp_path / "o.ome.tif"), h[:, :, 0].reshape(12, 16, 12))


def test_rgb_tiff_reads_as_channels(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (2, 8, 9, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    got = read_stack(tmp_path / "rgb.tif")
    np.testing.assert_array_equal(got, np.moveaxis(rgb, -1, 1))
    np.testing.assert_array_equal(np.concatenate(list(iter_pages(tmp_path / "rgb.tif", 1))), got)
    planar = np.moveaxis(rgb, -1, 1)
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_stack(tmp_path / "planar.tif"), planar)
    np.testing.assert_array_equal(np.concatenate(list(iter_pages(tmp_path / "planar.tif", 1))), planar)


def test_isbi_real_stacks(isbi_dir):
    ds = load_dataset(isbi_dir)
    assert len(ds) == 30 and len(ds.labels) == 30
    assert ds.images[0].shape == (1, 512, 512) and ds.images[0].dtype == np.float32
    assert all(set(np.unique(lab).tolist()) == {0, 1} for lab in ds.labels)
    assert 0.0 <= min(im.min() for im in ds.images) and max(im.max() for im in ds.images) <= 1.0
    # The old ImageJ header calls the 30 slices "channels"; they must still come out as 30 slices.
    assert stack_info(isbi_dir / "train-volume.tif") == StackInfo(isbi_dir / "train-volume.tif", 30, 512, 512, 1,
                                                                  np.dtype(np.uint8))
    chunks = list(iter_pages(isbi_dir / "test-volume.tif", 8))
    assert [len(c) for c in chunks] == [8, 8, 8, 6]
    np.testing.assert_array_equal(np.concatenate(chunks), read_stack(isbi_dir / "test-volume.tif"))
    test = load_dataset(isbi_dir, split="test", require_labels=False)
    assert len(test) == 30 and test.labels is None


def _membrane_corr(images, labels):
    dark = np.concatenate([1 - im[0].ravel() for im in images])
    membrane = np.concatenate([(lab == 0).ravel() for lab in labels]).astype(np.float32)
    return np.corrcoef(dark, membrane)[0, 1]


def test_isbi_labels_are_aligned(isbi_dir):
    ds = load_dataset(isbi_dir).subset(range(0, 30, 3))
    true = _membrane_corr(ds.images, ds.labels)
    shift3 = _membrane_corr(ds.images, [np.roll(lab, 3, axis=1) for lab in ds.labels])
    shift8 = _membrane_corr(ds.images, [np.roll(lab, 8, axis=0) for lab in ds.labels])
    flipped = _membrane_corr(ds.images, [lab[::-1] for lab in ds.labels])
    other = _membrane_corr(ds.images, ds.labels[1:] + ds.labels[:1])
    assert true > 0.45, true
    # Membranes are 5-10 px wide, so a 3 px shift still overlaps them partly; 8 px hardly at all.
    assert shift3 < 0.8 * true and shift8 < 0.4 * true, (true, shift3, shift8)
    assert flipped < 0.2 * true and other < 0.2 * true, (true, flipped, other)


def test_dirs_layout_pairs_by_sorted_name(tmp_path):
    img, lab = _stack(n=3)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for k in (2, 0, 1):
        Image.fromarray(img[k]).save(tmp_path / "images" / f"s{k}.png")
        tifffile.imwrite(tmp_path / "labels" / f"s{k}_mask.tif", (lab[k] == 255).astype(np.uint8))
    ds = load_dataset(tmp_path)
    assert ds.names == ["s0", "s1", "s2"]
    for k in range(3):
        np.testing.assert_array_equal(ds.images[k][0], img[k] / np.float32(255))
        np.testing.assert_array_equal(ds.labels[k], (lab[k] == 255).astype(np.uint8))
    sub = ds.subset([2, 0])
    assert isinstance(sub, SliceSet) and sub.names == ["s2", "s0"] and len(sub) == 2


def test_synthetic_when_no_dir():
    ds = load_dataset(None)
    assert len(ds) == 30 and ds.images[0].shape == (1, 256, 256) and ds.source == "synthetic"


# ------------------------------------------------------------------------------------------ bad input

def test_missing_dir_and_file(tmp_path):
    with pytest.raises(UserError, match=r"nope: data directory not found; check --data-dir"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(UserError, match=r"x.tif: file not found; check the path"):
        read_stack(tmp_path / "x.tif")
    with pytest.raises(UserError, match=r"no data found; expected train-volume.tif"):
        load_dataset(tmp_path)
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match=r"a.jpg: unsupported file type '.jpg'; use TIFF"):
        read_stack(tmp_path / "a.jpg")


def test_missing_labels(tmp_path):
    img, _ = _stack()
    _isbi_layout(tmp_path, img)
    with pytest.raises(UserError, match=r"train-labels.tif: file not found; labels are needed here"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, require_labels=False).labels is None
    with pytest.raises(UserError, match=r"test-volume.tif: file not found; the ISBI layout needs"):
        load_dataset(tmp_path, split="test", require_labels=False)
    d = tmp_path / "dirs"
    (d / "images").mkdir(parents=True)
    Image.fromarray(img[0]).save(d / "images" / "a.png")
    with pytest.raises(UserError, match=r"labels: no label files; put one TIFF/PNG label per image"):
        load_dataset(d)


def test_bad_label_values(tmp_path):
    img, lab = _stack()
    lab[0, 0, :3] = [7, 128, 3]
    _isbi_layout(tmp_path, img, lab)
    with pytest.raises(UserError, match=r"train-labels.tif: label values are \{0, 3, 7, 128, 255\} but must be "
                                        r"\{0, 255\} or \{0, 1\}"):
        load_dataset(tmp_path)


def test_slice_count_and_size_mismatch(tmp_path):
    img, lab = _stack(n=3)
    _isbi_layout(tmp_path, img, lab[:2])
    with pytest.raises(UserError, match=r"train-labels.tif: 2 label slices for 3 image slices"):
        load_dataset(tmp_path)
    _isbi_layout(tmp_path, img, lab[:, :, :20])
    with pytest.raises(UserError, match=r"train-labels.tif: label size 20x20 differs from image size 24x20"):
        load_dataset(tmp_path)


def test_rgb_rejected(tmp_path):
    rgb = np.zeros((2, 8, 8, 3), np.uint8)
    tifffile.imwrite(tmp_path / "train-volume.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "train-labels.tif", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(UserError, match=r"train-volume.tif: images have 3 channels \(RGB\) but 1 expected; "
                                        r"convert the images to grayscale"):
        load_dataset(tmp_path)
    tifffile.imwrite(tmp_path / "train-volume.tif", np.zeros((2, 8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "train-labels.tif", rgb, photometric="rgb")
    with pytest.raises(UserError, match=r"train-labels.tif: labels have 3 channels"):
        load_dataset(tmp_path)


@pytest.mark.filterwarnings("ignore:.*zero-size array")
def test_empty_stack(tmp_path):
    tifffile.imwrite(tmp_path / "e.tif", np.zeros((0, 8, 8), np.uint8))
    with pytest.raises(UserError, match=r"e.tif: (the stack is empty|TIFF file has no images)"):
        read_stack(tmp_path / "e.tif")
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match=r"images: no TIFF or PNG files"):
        load_dataset(tmp_path)


def test_unreadable_and_truncated(tmp_path):
    (tmp_path / "g.tif").write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match=r"g.tif: cannot be read \(not a TIFF file.*\); the file is truncated "
                                        r"or corrupt"):
        read_stack(tmp_path / "g.tif")
    img, _ = _stack(n=5, h=64, w=64)
    tifffile.imwrite(tmp_path / "t.tif", img, photometric="minisblack")
    data = (tmp_path / "t.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match=r"t.tif: page 1 cannot be read .*truncated or corrupt"):
        read_stack(tmp_path / "t.tif")
    with pytest.raises(UserError, match=r"t.tif: page 1 cannot be read"):
        list(iter_pages(tmp_path / "t.tif", 2))
    Image.fromarray(img[0]).save(tmp_path / "p.png")
    png = (tmp_path / "p.png").read_bytes()
    (tmp_path / "p.png").write_bytes(png[:len(png) // 2])
    with pytest.raises(UserError, match=r"p.png: cannot be read .*truncated or corrupt"):
        read_stack(tmp_path / "p.png")


def test_messages_are_one_line(tmp_path):
    (tmp_path / "g.tif").write_bytes(b"II*\x00" + b"\xff" * 40)
    with pytest.raises(UserError) as err:
        read_stack(tmp_path / "g.tif")
    assert "\n" not in str(err.value) and "g.tif" in str(err.value)


def test_pages_of_different_sizes_are_refused_not_dropped(tmp_path):
    path = tmp_path / "odd.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(np.zeros((2, 32, 32), np.uint8))
        tw.write(np.zeros((40, 32), np.uint8))
    for reader in (read_stack, stack_info):
        with pytest.raises(UserError, match=r"odd.tif: page 2 is 32x40 but the stack's first page is 32x32"):
            reader(path)


# ------------------------------------------------------------------------------- truncated stacks, NaN

def _truncate(src, dst, fraction=0.5):
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize("writer", ["imagej", "plain", "ome"])
def test_truncated_stack_refused_by_every_reader(tmp_path, writer):
    img = np.random.default_rng(0).random((6, 32, 32)).astype(np.float32)
    options = {"imagej": {"imagej": True}, "plain": {}, "ome": {"ome": True, "metadata": {"axes": "ZYX"}}}[writer]
    tifffile.imwrite(tmp_path / "full.tif", img, **options)
    np.testing.assert_array_equal(read_stack(tmp_path / "full.tif"), img)
    cut = _truncate(tmp_path / "full.tif", tmp_path / "cut.tif")
    pattern = r"cut.tif: page 1 cannot be read .*truncated or corrupt"
    for read in (read_stack, stack_info, lambda p: list(iter_pages(p, 2))):
        with pytest.raises(UserError, match=pattern):
            read(cut)


def test_truncated_isbi_volume_refused(tmp_path, isbi_dir):
    cut = _truncate(isbi_dir / "test-volume.tif", tmp_path / "test-volume.tif")
    with pytest.raises(UserError, match=r"test-volume.tif: page 1 cannot be read \(the file holds 1 readable "
                                        r"page\(s\) of 30 its header lists\)"):
        read_stack(cut)


def test_pixel_data_past_end_of_file_names_the_page(tmp_path):
    # IFDs first, pixel data after them: a cut keeps every page header but loses the last pages' pixels.
    img = np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16)
    tifffile.imwrite(tmp_path / "s.tif", img, photometric="minisblack", metadata=None)
    data = (tmp_path / "s.tif").read_bytes()
    with tifffile.TiffFile(tmp_path / "s.tif") as tif:
        end_of_page2 = tif.pages[2].dataoffsets[0] + tif.pages[2].databytecounts[0]
    cut = tmp_path / "c.tif"
    cut.write_bytes(data[:end_of_page2 - 1])
    with pytest.raises(UserError, match=r"c.tif: page [12] cannot be read"):
        read_stack(cut)


def test_imagej_header_count_disagreeing_with_pages_refused(tmp_path):
    img = np.zeros((3, 8, 8), np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", img, imagej=True)
    data = (tmp_path / "s.tif").read_bytes().replace(b"images=3", b"images=5")
    (tmp_path / "h.tif").write_bytes(data)
    with pytest.raises(UserError, match=r"h.tif: page 3 cannot be read \(its header lists 5 image\(s\) but "
                                        r"the file holds 3 page\(s\)\)"):
        read_stack(tmp_path / "h.tif")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_refused_naming_file_and_slice(tmp_path, bad):
    img = np.random.default_rng(0).random((5, 16, 16)).astype(np.float32)
    img[3, 4, 5] = bad
    tifffile.imwrite(tmp_path / "f.tif", img, photometric="minisblack")
    pattern = r"f.tif: slice 3 has 1 non-finite pixel\(s\) \(NaN or Inf\)"
    with pytest.raises(UserError, match=pattern):
        read_stack(tmp_path / "f.tif")
    chunks = iter_pages(tmp_path / "f.tif", 2)
    assert next(chunks).shape == (2, 16, 16)  # slices 0-1 are clean and come through
    with pytest.raises(UserError, match=pattern):
        list(chunks)
    _isbi_layout(tmp_path, img, np.full((5, 16, 16), 255, np.uint8))
    with pytest.raises(UserError, match=r"train-volume.tif: slice 3 has 1 non-finite"):
        load_dataset(tmp_path)


def test_small_slices_and_unrelated_names_warn_once(tmp_path, capsys):
    img, lab = _stack(n=2, h=8, w=8)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for k in range(2):
        tifffile.imwrite(tmp_path / "images" / f"em{k}.tif", img[k])
        tifffile.imwrite(tmp_path / "labels" / f"seg_{k}.tif", lab[k])
    load_dataset(tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("warning: ") and "labels: no label file has the name of an image file" in err[0]
    assert "em0.tif: 2 slice(s) smaller than 16 pixels on a side (first: 8x8)" in err[1]
    for k in range(2):
        (tmp_path / "labels" / f"seg_{k}.tif").rename(tmp_path / "labels" / f"em{k}.tif")
    big_img, big_lab = _stack(n=2, h=16, w=16)
    for k in range(2):
        tifffile.imwrite(tmp_path / "images" / f"em{k}.tif", big_img[k])
        tifffile.imwrite(tmp_path / "labels" / f"em{k}.tif", big_lab[k])
    load_dataset(tmp_path)
    assert capsys.readouterr().err == ""


def test_warnings_only_from_rank_0(tmp_path, capsys, monkeypatch):
    img, lab = _stack(n=1, h=8, w=8)
    tifffile.imwrite(tmp_path / "train-volume.tif", img)
    tifffile.imwrite(tmp_path / "train-labels.tif", lab)
    monkeypatch.setenv("RANK", "1")
    load_dataset(tmp_path)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    load_dataset(tmp_path)
    assert "smaller than 16 pixels on a side" in capsys.readouterr().err


def test_huge_finite_pixels_are_not_mistaken_for_inf(tmp_path):
    img = np.full((2, 16, 16), 3e38, np.float32)  # every slice's sum overflows to inf
    tifffile.imwrite(tmp_path / "h.tif", img, photometric="minisblack")
    np.testing.assert_array_equal(read_stack(tmp_path / "h.tif"), img)
