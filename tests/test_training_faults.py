"""Training faults: bad data caught before step 1, honest divergence messages, best.pt kept across a resume."""
import io
import json

import numpy as np
import pytest
import tifffile
import torch

from unet.cli import train as cli_train
from unet.training import trainer as training
from unet.checkpoint import load_checkpoint
from unet.errors import UserError

TINY = ["--base-filters", "4", "--depth", "2", "--padding", "same", "--input-size", "32", "--batch-size", "2",
        "--workers", "0", "--no-progress", "--log-every", "1"]


def run(model_dir, *extra):
    return cli_train.main(cli_train.get_args_parser().parse_args(TINY + ["--model-dir", str(model_dir), *extra]))


def test_nan_in_training_data_stops_before_step_1_naming_the_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.random((5, 32, 32)).astype(np.float32)
    images[2].flat[rng.choice(32 * 32, 20, replace=False)] = np.nan  # 2 % of one slice
    tifffile.imwrite(tmp_path / "train-volume.tif", images, photometric="minisblack")
    tifffile.imwrite(tmp_path / "train-labels.tif", np.full((5, 32, 32), 255, np.uint8), photometric="minisblack")
    steps = []
    monkeypatch.setattr(training, "optimizer_step", lambda *a, **k: steps.append(1))
    with pytest.raises(UserError, match=r"train-volume.tif: slice 2 has 20 non-finite pixel\(s\) \(NaN or Inf\)"):
        run(tmp_path / "model", "--data-dir", str(tmp_path), "--max-steps", "3")
    assert steps == [] and not (tmp_path / "model").exists()


def test_divergence_before_any_checkpoint_names_no_file(tmp_path, monkeypatch):
    real = training.ce_dice_loss
    monkeypatch.setattr(training, "ce_dice_loss", lambda logits, target: real(logits, target) * float("nan"))
    with pytest.raises(training.TrainingDiverged) as info:
        run(tmp_path / "run", "--max-steps", "4", "--save-every", "2")
    message = str(info.value)
    assert "non-finite at step 1; stopped, no checkpoint was written;" in message
    assert "last.pt" not in message and not (tmp_path / "run" / "last.pt").exists()


def _scripted_validation(monkeypatch, scores):
    """Validation returns ``scores`` in call order: a best at step 4 and a worse score after it."""
    def fake(model, val_set, dev, **kwargs):
        return {"dice_nvidia": scores.pop(0)}
    monkeypatch.setattr(training, "evaluate_slices", fake)


def test_resume_keeps_best_score_step_and_best_pt(tmp_path, monkeypatch):
    # Resetting the best score on resume would let the worse step-6 model overwrite best.pt.
    common = ("--max-steps", "6", "--save-every", "2", "--evaluate-every", "2", "--fold", "0")
    _scripted_validation(monkeypatch, [0.6, 0.8, 0.7])
    straight = run(tmp_path / "straight", *common)
    _scripted_validation(monkeypatch, [0.6, 0.8])
    args = cli_train.get_args_parser().parse_args(TINY + ["--model-dir", str(tmp_path / "split"), *common])
    args.max_steps = 4
    cli_train.main(args)
    _scripted_validation(monkeypatch, [0.7])
    split = run(tmp_path / "split", *common, "--resume")
    assert straight["best_step"] == split["best_step"] == 4
    assert straight["best_dice_nvidia"] == split["best_dice_nvidia"] == 0.8
    a, b = (load_checkpoint(tmp_path / d / "best.pt") for d in ("straight", "split"))
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_interrupted_metrics_write_leaves_only_whole_lines_and_the_earlier_records(tmp_path, monkeypatch):
    import errno
    from unet import run_log
    path = tmp_path / "metrics.jsonl"
    log = run_log.MetricsLog(path)
    log.write({"kind": "train", "step": 1, "loss": 0.5})
    log.write({"kind": "train", "step": 2, "loss": 0.4})
    before = path.read_bytes()
    real = run_log.atomic_write

    def half_way(target, write):  # the disk fills half-way through writing the new contents
        def torn(f):
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(target, torn)
    monkeypatch.setattr(run_log, "atomic_write", half_way)
    with pytest.raises(UserError, match="cannot write .*metrics.jsonl"):
        log.write({"kind": "val", "step": 2, "val": {"dice_nvidia": 0.9}})
    assert path.read_bytes() == before and path.read_text().endswith("\n")
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary left behind
    monkeypatch.setattr(run_log, "atomic_write", real)
    log.write({"kind": "train", "step": 3, "loss": 0.3})  # the failed record is not written later either
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
