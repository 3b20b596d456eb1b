"""TensorBoard event files (unet.training.tensorboard): what is written, resume purging, the optional package."""
import numpy as np
import pytest

from unet.training.tensorboard import FOLDER, HOW_TO_TURN_ON, TensorBoardLog, open_tensorboard, panel

pytest.importorskip("tensorboard")  # the test extra installs it

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(folder):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_records_become_scalars_and_pictures_images(tmp_path):
    log = TensorBoardLog(tmp_path / FOLDER)
    log.record({"kind": "train", "step": 10, "loss": 0.5, "lr": 1e-4, "images_per_s": 3.0, "loss_scale": None})
    log.record({"kind": "val", "step": 10, "val": {"dice_nvidia": 0.9, "pixel_error": 0.07, "slices": 6}})
    log.record({"kind": "train", "step": 20, "loss": float("nan"), "lr": 1e-4, "images_per_s": 3.0})
    picture = panel(np.full((1, 8, 8), 0.5, np.float32), np.ones((8, 8), np.float32), np.ones((8, 8), np.uint8))
    log.pictures(10, {"slice_000": picture})
    log.close()
    scalars, acc = _scalars(tmp_path / FOLDER)
    assert scalars["train/loss"] == [(10, 0.5)]  # NaN (all steps skipped) and None are left out, not plotted
    assert scalars["train/lr"] == [(10, pytest.approx(1e-4)), (20, pytest.approx(1e-4))]
    assert scalars["val/dice_nvidia"] == [(10, pytest.approx(0.9))]
    assert "train/loss_scale" not in scalars
    assert acc.Tags()["images"] == ["val_images/slice_000"]
    image = acc.Images("val_images/slice_000")[0]
    assert (image.width, image.height, image.step) == (24, 8, 10)


def test_resume_purges_the_steps_that_will_be_redone(tmp_path):
    log = TensorBoardLog(tmp_path / FOLDER)
    for step in (10, 20, 30):
        log.record({"kind": "train", "step": step, "loss": step / 100, "lr": 1.0})
    log.close()
    log = TensorBoardLog(tmp_path / FOLDER, resume_step=20)  # the checkpoint was taken at step 20
    log.record({"kind": "train", "step": 30, "loss": 0.25, "lr": 1.0})
    log.close()
    scalars, _ = _scalars(tmp_path / FOLDER)
    assert scalars["train/loss"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.2)), (30, pytest.approx(0.25))]


def test_without_the_package_one_line_says_how_to_turn_it_on(tmp_path, monkeypatch):
    monkeypatch.setattr("unet.training.tensorboard.tensorboard_installed", lambda: False)
    said = []
    assert open_tensorboard(tmp_path, None, None, said.append) is None
    assert said == [HOW_TO_TURN_ON] and "pip install tensorboard" in said[0]
    with pytest.raises(ImportError, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
        open_tensorboard(tmp_path, True, None, said.append)
    assert open_tensorboard(tmp_path, False, None, said.append) is None and len(said) == 1
    assert not (tmp_path / FOLDER).exists()


def test_panel_shows_input_probability_and_target_with_ignored_pixels_red():
    image = np.zeros((1, 2, 2), np.float32)
    prob = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    target = np.array([[0, 1], [255, 1]], np.uint8)
    picture = panel(image, prob, target)
    assert picture.shape == (2, 6, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(picture[:, 2:4, 0], [[0, 255], [255, 0]])  # the probability
    np.testing.assert_array_equal(picture[1, 4], [255, 0, 0])  # ignored: red
    np.testing.assert_array_equal(picture[0, 5], [255, 255, 255])  # class 1 of 0..1: white


def test_train_py_writes_events_by_default_and_none_with_no_tensorboard(tmp_path, capsys):
    from unet.cli import train as cli_train
    tiny = ["--base-filters", "4", "--depth", "3", "--padding", "same", "--input-size", "64", "--batch-size", "4",
            "--workers", "0", "--no-progress", "--log-every", "2", "--max-steps", "4", "--fold", "0",
            "--evaluate-every", "2"]
    cli_train.main(cli_train.get_args_parser().parse_args(tiny + ["--model-dir", str(tmp_path / "on")]))
    scalars, acc = _scalars(tmp_path / "on" / FOLDER)
    assert [s for s, _ in scalars["train/loss"]] == [2, 4] and [s for s, _ in scalars["val/dice_nvidia"]] == [2, 4]
    images = acc.Tags()["images"]
    assert len(images) == 2 and all(t.startswith("val_images/synthetic_") for t in images)
    # the pictures are input | probability | target of the 256x256 validation slices
    assert (acc.Images(images[0])[0].width, acc.Images(images[0])[0].height) == (3 * 256, 256)
    cli_train.main(cli_train.get_args_parser().parse_args(tiny + ["--model-dir", str(tmp_path / "off"),
                                                                  "--no-tensorboard"]))
    assert not (tmp_path / "off" / FOLDER).exists()


def test_tensorboard_flag_without_the_package_is_refused_before_any_work(tmp_path, monkeypatch):
    from unet.errors import UserError
    from unet.training.config import RunConfig, check_config
    monkeypatch.setattr("unet.training.config.tensorboard_installed", lambda: False)
    with pytest.raises(UserError, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
        check_config(RunConfig(model_dir=str(tmp_path / "m"), tensorboard=True))
    assert not (tmp_path / "m").exists()
