"""Own data in train.py and evaluate.py (issue 21 items 1-2): TIFF stacks, folders and chunked volumes, the z-range
validation, K classes, sparse labels with the ignore value, and the one-line refusals."""
import h5py
import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from ome_files import write_ome_zarr
from unet.checkpoint import load_checkpoint
from unet.cli import evaluate as cli_evaluate
from unet.cli import train as cli_train
from unet.data.datasets import DataOptions, SliceSet
from unet.data.labels import IGNORE, LabelOptions
from unet.data.own_data import load_split, read_pair
from unet.data.sampling import TrainTiles
from unet.errors import UserError
from unet.io.volumes import VolumeOptions

TINY = ["--base-filters", "4", "--depth", "3", "--padding", "same", "--input-size", "32", "--batch-size", "2",
        "--workers", "0", "--no-progress", "--log-every", "1"]


def _data(n=6, size=48, seed=0, classes=2):
    """uint8 images and their labels: binary {0, 255} (bright = cell) or classes 0..K-1 by brightness."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    if classes == 2:
        return img, np.where(img > 100, 255, 0).astype(np.uint8)
    return img, np.digitize(img, np.linspace(0, 256, classes + 1)[1:-1]).astype(np.uint8)


def _tif(path, stack):
    tifffile.imwrite(path, stack, photometric="minisblack")  # 3 or 4 slices would be taken for RGB(A)


def _tiff_pair(folder, n=6, **kw):
    img, lab = _data(n, **kw)
    folder.mkdir(parents=True, exist_ok=True)
    _tif(folder / "img.tif", img)
    _tif(folder / "lab.tif", lab)
    return str(folder / "img.tif"), str(folder / "lab.tif")


def train(tmp_path, *extra, name="run"):
    args = cli_train.get_args_parser().parse_args(TINY + ["--model-dir", str(tmp_path / name), *extra])
    return cli_train.main(args)


def evaluate(*argv):
    return cli_evaluate.main(cli_evaluate.get_args_parser().parse_args(
        [*argv, "--no-thinned", "--no-instances", "--device", "cpu"]))


def test_tiff_stack_trains_with_a_z_range_held_out_and_evaluate_reads_it_back(tmp_path, capsys):
    images, labels = _tiff_pair(tmp_path / "d")
    summary = train(tmp_path, "--train-images", images, "--train-labels", labels, "--val-slices", "4:6",
                    "--max-steps", "2")
    out = capsys.readouterr().out
    assert "4 training / 2 validation slices (slices 4:6 held out); labels binary (2 classes)" in out
    assert summary["final_validation"]["num_images"] == 2 and summary["held_out"] == "slices 4:6 held out"
    args = load_checkpoint(tmp_path / "run" / "last.pt")["args"]
    assert (args["train_images"], args["train_labels"], args["val_slices"]) == (images, labels, "4:6")
    record = evaluate("--ckpt", str(tmp_path / "run" / "last.pt"))
    assert record["fold"]["val_indices"] == [4, 5] and record["fold"]["val_names"] == ["img_004", "img_005"]
    assert record["metrics"]["dice_nvidia"] == pytest.approx(summary["final_validation"]["dice_nvidia"], abs=1e-6)


def test_folder_trains_and_validates_on_a_separate_hdf5_and_zarr_set(tmp_path, capsys):
    img, lab = _data(4)
    for sub, stack in (("images", img), ("labels", lab)):
        (tmp_path / sub).mkdir()
        for k, a in enumerate(stack):
            Image.fromarray(a).save(tmp_path / sub / f"s{k}.png")
    vimg, vlab = _data(3, seed=1)
    with h5py.File(tmp_path / "val.h5", "w") as f:
        f.create_dataset("raw", data=vimg)
    zarr.create_array(str(tmp_path / "vlab.zarr"), shape=vlab.shape, dtype=vlab.dtype, chunks=(1, 16, 16))[:] = vlab
    summary = train(tmp_path, "--train-images", str(tmp_path / "images"), "--train-labels", str(tmp_path / "labels"),
                    "--val-images", str(tmp_path / "val.h5/raw"), "--val-labels", str(tmp_path / "vlab.zarr"),
                    "--max-steps", "2")
    assert "4 training / 3 validation slices (validation set " in capsys.readouterr().out
    assert summary["final_validation"]["num_images"] == 3
    record = evaluate("--ckpt", str(tmp_path / "run" / "last.pt"))
    assert record["fold"]["val_indices"] == [0, 1, 2] and record["data"]["source"] == str(tmp_path / "val.h5/raw")


def _ome_pair(folder):
    """A tczyx OME-Zarr image (2 time points, 2 channels, 3 slices, 2 levels) and its tzyx label image."""
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (2, 2, 3, 40, 40), dtype=np.uint8)
    lab = np.where(img[:, 1] > 100, 255, 0).astype(np.uint8)
    write_ome_zarr(folder / "img.ome.zarr", "tczyx", [img, img[..., ::2, ::2]])
    write_ome_zarr(folder / "lab.ome.zarr", "tzyx", [lab, lab[..., ::2, ::2]])
    return str(folder / "img.ome.zarr"), str(folder / "lab.ome.zarr"), img, lab


def test_scale_channel_and_time_pick_the_training_slices_and_evaluate_keeps_them(tmp_path):
    images, labels, img, lab = _ome_pair(tmp_path)
    volume = VolumeOptions(scale=1, channel=1, time=1)
    split = load_split(DataOptions(train_images=images, train_labels=labels), LabelOptions(), volume)
    for k in range(3):  # level 1, time point 1, channel 1: one channel of 20 x 20, labels at the same level
        np.testing.assert_allclose(split.train.images[k][0], img[1, 1, k, ::2, ::2] / 255.0, atol=1e-6)
        np.testing.assert_array_equal(split.train.labels[k], lab[1, k, ::2, ::2] > 0)
    summary = train(tmp_path, "--train-images", images, "--train-labels", labels, "--val-slices", "2:3",
                    "--scale", "1", "--channel", "1", "--time", "1", "--input-size", "16", "--max-steps", "1")
    args = load_checkpoint(tmp_path / "run" / "last.pt")["args"]
    assert (args["scale"], args["channel"], args["time"]) == (1, 1, 1)
    record = evaluate("--ckpt", str(tmp_path / "run" / "last.pt"))  # the checkpoint's level, channel and time
    assert record["metrics"]["dice_nvidia"] == pytest.approx(summary["final_validation"]["dice_nvidia"], abs=1e-6)
    other = evaluate("--ckpt", str(tmp_path / "run" / "last.pt"), "--time", "0")  # given here: replaces it
    assert other["metrics"]["dice_nvidia"] != pytest.approx(record["metrics"]["dice_nvidia"], abs=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--scale", "1"], "--scale 1: only for chunked volumes, which --train-images and --val-images name"),
    (["--time", "0", "--channel", "0"], "--channel 0, --time 0: only for chunked volumes"),
])
def test_volume_choices_without_own_volumes_are_refused(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train(tmp_path, *extra, "--max-steps", "1")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_scale_of_a_tiff_stack_is_refused_naming_it(tmp_path):
    images, labels = _tiff_pair(tmp_path / "d")
    with pytest.raises(UserError, match=r"img.tif: scale 1 asked for, but only OME-Zarr images have resolution"):
        train(tmp_path, "--train-images", images, "--train-labels", labels, "--scale", "1", "--max-steps", "1")


def test_three_classes_give_a_three_logit_head_and_per_class_metrics(tmp_path):
    images, labels = _tiff_pair(tmp_path / "d", classes=3)
    summary = train(tmp_path, "--train-images", images, "--train-labels", labels, "--val-slices", "0:2",
                    "--label-kind", "classes", "--num-classes", "3", "--max-steps", "2")
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["model_config"]["num_classes"] == 3 and ckpt["model"]["out.head.weight"].shape[0] == 3
    assert {"dice_class_0", "dice_class_1", "dice_class_2"} <= set(summary["final_validation"])
    split = load_split(DataOptions(train_images=images, train_labels=labels),
                       LabelOptions(label_kind="classes", num_classes=3))
    assert sorted(np.unique(np.concatenate([t.ravel() for t in split.train.labels])).tolist()) == [0, 1, 2]


def test_sparse_labels_train_and_every_crop_holds_labelled_pixels(tmp_path):
    img, lab = _data(4)
    sparse = np.full_like(lab, 7)  # 7 = unlabelled
    sparse[:, 20, 5:15] = lab[:, 20, 5:15]  # one short scribble per slice: 10 of 2304 pixels
    sparse[3] = 7  # and a slice without any label
    _tif(tmp_path / "img.tif", img)
    _tif(tmp_path / "lab.tif", sparse)
    options = LabelOptions(ignore_label=7)
    slices = read_pair(str(tmp_path / "img.tif"), str(tmp_path / "lab.tif"), options)
    assert (slices.labels[3] == IGNORE).all() and (slices.labels[0] != IGNORE).sum() == 10
    for augment in (False, True):
        tiles = TrainTiles(slices, 20, 8, augment=augment, seed=3)
        for i in range(40):
            _, label = tiles.sample(i)
            assert (label != IGNORE).any(), f"sample {i} (augment {augment}) has no labelled pixel"
            assert torch.equal(label, tiles.sample(i)[1])  # still a pure function of the index
    train(tmp_path, "--train-images", str(tmp_path / "img.tif"), "--train-labels", str(tmp_path / "lab.tif"),
          "--ignore-label", "7", "--val-slices", "0:1", "--max-steps", "3")
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"loss": null' not in log and "NaN" not in log


def test_dense_sets_draw_exactly_as_before():
    img, lab = _data(3)
    slices = SliceSet([im[None].astype(np.float32) / 255 for im in img], [(la > 0).astype(np.uint8) for la in lab],
                      ["a", "b", "c"], "t")
    tiles = TrainTiles(slices, 20, 8, augment=False, seed=5)
    for i in range(5):
        rng = np.random.default_rng([5, 0, i])
        k = int(rng.integers(3))
        cy, cx = int(rng.integers(48)), int(rng.integers(48))
        assert tiles._crop_centre(np.random.default_rng([5, 0, i])) == (k, (cy, cx))


@pytest.mark.parametrize("setup, extra, message", [
    ("shape", [], "lab.tif: label slice 0 is 40x40 but image slice 0 of"),
    ("count", [], "lab.tif: 5 label slices for 6 image slices of"),
    ("values", ["--label-kind", "classes", "--num-classes", "3"], "lab.tif: label values {5} are outside 0..2"),
    ("all-ignore", ["--ignore-label", "0"], "lab.tif: every label pixel has the ignore value"),
    ("ok", ["--val-slices", "4:9"], "--val-slices 4:9: "),
    ("ok", ["--val-slices", "0:6"], "--val-slices 0:6 holds out all 6 slices"),
    ("ok", ["--val-slices", "0:2", "--fold", "1"], "--fold and --val-slices each choose the validation slices"),
    ("no-labels", [], "--train-images needs --train-labels"),
    ("ok", ["--data-dir", "x"], "--train-images and --data-dir both name the training data"),
])
def test_bad_own_data_is_one_line_and_writes_nothing(tmp_path, setup, extra, message):
    images, labels = _tiff_pair(tmp_path / "d")
    img, lab = _data(6)
    if setup == "shape":
        _tif(labels, lab[:, :40, :40])
    elif setup == "count":
        _tif(labels, lab[:5])
    elif setup == "values":
        lab = (lab > 0).astype(np.uint8)
        lab[2, 3, 3] = 5
        _tif(labels, lab)
    elif setup == "all-ignore":
        _tif(labels, np.zeros_like(lab))
    argv = ["--train-images", images] + ([] if setup == "no-labels" else ["--train-labels", labels])
    with pytest.raises(UserError) as e:
        train(tmp_path, *argv, *extra, "--max-steps", "1")
    assert message in str(e.value) and "\n" not in str(e.value)
    if setup == "shape":
        assert "img.tif" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_non_binary_kind_needs_own_labels(tmp_path):
    with pytest.raises(UserError, match="--label-kind instances needs own labels"):
        train(tmp_path, "--label-kind", "instances", "--max-steps", "1")
