"""evaluate.py's cross-validation table with K > 2 classes (issue 21): one Dice and one IoU column per class;
two-class tables keep their columns."""
import numpy as np
import tifffile

from unet.cli import evaluate as cli_evaluate
from unet.cli import train as cli_train
from unet.evaluation import tables


def _fold(names, value):
    return {"dice_nvidia": value, "dice_mean": value, "iou_mean": value, "pixel_error": 1 - value,
            **{f"dice_{n}": value for n in names}, **{f"iou_{n}": value / 2 for n in names}}


def test_three_classes_get_per_class_columns_and_two_keep_the_table():
    names = ["class_0", "class_1", "class_2"]
    per_fold = [_fold(names, 0.5), _fold(names, 0.7)]
    summary = tables.cv_summary(per_fold)
    assert summary["mean"]["dice_class_2"] == 0.6 and summary["mean"]["iou_class_0"] == 0.3
    header = tables.cv_markdown(["0", "1"], per_fold, summary).splitlines()[0]
    assert "Dice class_0 | Dice class_1 | Dice class_2 | IoU class_0" in header
    two = [_fold(["membrane", "cell"], 0.5), _fold(["membrane", "cell"], 0.7)]
    header = tables.cv_markdown(["0", "1"], two, tables.cv_summary(two)).splitlines()[0]
    assert header == "| Fold | Dice (NVIDIA) | Dice (mean) | IoU (mean) | Pixel error |"


def test_evaluate_prints_per_class_columns_for_two_three_class_runs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (6, 32, 32), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", img, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", (img // 86).astype(np.uint8), photometric="minisblack")
    ckpts = []
    for fold in ("0", "1"):
        cli_train.main(cli_train.get_args_parser().parse_args([
            "--base-filters", "2", "--depth", "2", "--padding", "same", "--input-size", "16", "--batch-size", "2",
            "--workers", "0", "--no-progress", "--max-steps", "1", "--folds", "3", "--fold", fold,
            "--train-images", str(tmp_path / "img.tif"), "--train-labels", str(tmp_path / "lab.tif"),
            "--label-kind", "classes", "--num-classes", "3", "--model-dir", str(tmp_path / fold)]))
        ckpts.append(str(tmp_path / fold / "last.pt"))
    out = cli_evaluate.main(cli_evaluate.get_args_parser().parse_args(
        ["--ckpt", *ckpts, "--no-thinned", "--no-instances", "--device", "cpu"]))
    assert "| Dice class_0 | Dice class_1 | Dice class_2 | IoU class_0 |" in out["cv"]["markdown"]
    assert "dice_class_2" in out["cv"]["mean"] and out["cv"]["markdown"] in capsys.readouterr().out
