"""evaluate.py end to end: JSON output, folds from the checkpoint, CV summary, one-line errors, torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unet.checkpoint import save_checkpoint
from unet.cli.commands import evaluate, train
from unet.data.synthetic import make_synthetic_em
from unet.model import UNet

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = ("dice_nvidia", "dice_membrane", "dice_cell", "dice_mean", "iou_membrane", "iou_cell",
               "iou_mean", "pixel_error", "v_rand", "v_info", "num_images")


def make_ckpt(path, seed=0, **args):
    torch.manual_seed(seed)
    model_kw = {"in_channels": args.pop("in_channels", 1)}
    save_checkpoint(path, UNet(base_filters=4, depth=3, padding="same", **model_kw), args=args)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """images/ + labels/ of six 64x64 synthetic PNG slices."""
    root = tmp_path_factory.mktemp("data")
    images, labels = make_synthetic_em(6, 64, 64, seed=1)
    for sub, arrs in (("images", images), ("labels", labels)):
        (root / sub).mkdir()
        for k, a in enumerate(arrs):
            Image.fromarray(a).save(root / sub / f"s{k:02d}.png")
    return root


def run_cli(argv, capsys):
    """unet.cli.commands.evaluate(argv) -> (exit code, stdout, stderr)."""
    try:
        code = evaluate([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_single_checkpoint_json(tmp_path, data_dir, capsys):
    ckpt = make_ckpt(tmp_path / "a.pt", fold=1, folds=3, fold_scheme="disjoint", seed=0, data_dir=str(data_dir))
    out_json = tmp_path / "r.json"
    code, out, err = run_cli(["--ckpt", ckpt, "--output", out_json, "--device", "cpu", "--per-image"], capsys)
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert set(METRIC_KEYS) <= set(r["metrics"])
    for k in METRIC_KEYS[:-1]:
        assert r["metrics"][k] is None or 0 <= r["metrics"][k] <= 1, k
    assert r["metrics"]["num_images"] == 2 and len(r["per_image"]) == 2
    assert r["fold"]["fold"] == 1 and r["fold"]["folds"] == 3 and r["fold"]["from"] == "checkpoint"
    assert r["data"]["source"] == str(data_dir) and r["checkpoint"] == str(ckpt)
    assert r["device"]["type"] == "cpu" and r["seconds"] > 0 and r["tiling"]["plans"]
    assert "fold 1 of 3" in out
    for k in METRIC_KEYS:  # the printed table: one line per metric
        assert any(line.split()[:1] == [k] for line in out.splitlines()), k


def test_synthetic_data_by_default(tmp_path, capsys):
    ckpt = make_ckpt(tmp_path / "a.pt", fold=0, folds=5)  # no data dir anywhere: the built-in set
    code, out, err = run_cli(["--ckpt", ckpt, "--output", tmp_path / "r.json", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "built-in synthetic" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["data"]["source"] == "synthetic" and r["data"]["num_slices"] == 30
    assert r["fold"]["fold"] == 0 and r["metrics"]["num_images"] == 6


def test_checkpoint_without_fold_evaluates_all_slices(tmp_path, data_dir, capsys):
    ckpt = make_ckpt(tmp_path / "a.pt", data_dir=str(data_dir))  # trained on all slices
    code, out, err = run_cli(["--ckpt", ckpt, "--output", tmp_path / "r.json", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "all 6 slices (the checkpoint was trained on all slices" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["fold"]["fold"] is None and r["metrics"]["num_images"] == 6


def test_command_line_overrides_checkpoint(tmp_path, data_dir, capsys):
    ckpt = make_ckpt(tmp_path / "a.pt", fold=0, folds=3, data_dir="/nonexistent/elsewhere")
    code, out, err = run_cli(["--ckpt", ckpt, "--data-dir", data_dir, "--fold", 2, "--folds", 2,
                              "--output", tmp_path / "r.json", "--device", "cpu"], capsys)
    assert code == 2 and "--fold 2 is out of range" in err  # folds=2 from the command line wins
    code, out, err = run_cli(["--ckpt", ckpt, "--output", tmp_path / "r.json", "--device", "cpu"], capsys)
    assert code == 2 and "recorded in checkpoint" in err and "--data-dir" in err
    code, out, err = run_cli(["--ckpt", ckpt, "--data-dir", data_dir, "--folds", 2,
                              "--output", tmp_path / "r.json", "--device", "cpu"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["fold"]["fold"] == 0 and r["fold"]["folds"] == 2 and r["metrics"]["num_images"] == 3


def test_cv_dir_summary(tmp_path, data_dir, capsys):
    runs = tmp_path / "results"
    for fold in range(3):
        (runs / f"fold{fold}").mkdir(parents=True)
        name = "last.pt" if fold == 2 else "best.pt"  # a run without best.pt falls back to last.pt
        make_ckpt(runs / f"fold{fold}" / name, seed=fold, fold=fold, folds=3, data_dir=str(data_dir))
    code, out, err = run_cli(["--cv-dir", runs, "--output", tmp_path / "cv.json", "--device", "cpu"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "cv.json").read_text())
    assert [run["fold"]["fold"] for run in r["runs"]] == [0, 1, 2]
    assert r["runs"][2]["checkpoint"].endswith("last.pt")
    for k in ("dice_nvidia", "dice_mean", "iou_mean", "pixel_error", "v_rand", "v_info"):
        v = np.array([run["metrics"][k] for run in r["runs"]], dtype=float)
        assert r["cv"]["mean"][k] == pytest.approx(v.mean(), rel=1e-9)
        assert r["cv"]["std"][k] == pytest.approx(v.std(ddof=1), rel=1e-9)
    assert "ddof=1" in r["cv"]["std_kind"]
    assert "| mean ± std |" in out and r["cv"]["markdown"] in out


@pytest.mark.parametrize("case", ["missing", "foreign", "no_labels", "fold_range", "channels", "empty_cv",
                                  "fold_with_many"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, data_dir, capsys):
    ckpt = make_ckpt(tmp_path / "ok.pt", fold=0, folds=3, data_dir=str(data_dir))
    if case == "missing":
        argv, expect = ["--ckpt", tmp_path / "nope.pt"], "nope.pt does not exist"
    elif case == "foreign":
        torch.save(UNet(base_filters=4, depth=3).state_dict(), tmp_path / "bare.pt")
        argv, expect = ["--ckpt", tmp_path / "bare.pt"], "is not a unet-em checkpoint"
    elif case == "no_labels":
        unlabelled = tmp_path / "nolabels"
        (unlabelled / "images").mkdir(parents=True)
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(unlabelled / "images" / "a.png")
        argv, expect = ["--ckpt", ckpt, "--data-dir", unlabelled], "labels"
    elif case == "fold_range":
        argv, expect = ["--ckpt", ckpt, "--fold", 7], "--fold 7 is out of range"
    elif case == "channels":
        rgb = make_ckpt(tmp_path / "rgb.pt", in_channels=3, fold=0, folds=3, data_dir=str(data_dir))
        argv, expect = ["--ckpt", rgb], "made for 3-channel input"
    elif case == "empty_cv":
        (tmp_path / "empty" / "run1").mkdir(parents=True)
        argv, expect = ["--cv-dir", tmp_path / "empty"], "holds no */best.pt or */last.pt"
    else:
        argv, expect = ["--ckpt", ckpt, ckpt, "--fold", 0], "--fold cannot be combined"
    code, out, err = run_cli([*argv, "--device", "cpu"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error: ") and expect in lines[0], err


@pytest.mark.parametrize("command", [evaluate, train])
@pytest.mark.parametrize("flag, value, message", [("--tile-batch", "0", "must be at least 1, got 0"),
                                                  ("--overlap", "1.5", "must be in [0, 1), got 1.5")])
def test_tiling_options_are_checked_when_parsed(command, flag, value, message, tmp_path, capsys):
    """A bad tiling option fails before evaluation (or training, which needs it only to validate) starts."""
    prog, where = ("evaluate.py", "--ckpt") if command is evaluate else ("train.py", "--model-dir")
    with pytest.raises(SystemExit) as e:
        command([where, str(tmp_path / "x"), flag, value])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"{prog}: error: argument {flag}: {message}"
    assert list(tmp_path.iterdir()) == []


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # subprocesses
def test_subprocess_exit_code_and_one_line(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--ckpt", str(tmp_path / "missing.pt")],
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "missing.pt does not exist" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, data_dir):
    ckpt = make_ckpt(tmp_path / "a.pt", fold=None, data_dir=str(data_dir))
    common = ["--ckpt", str(ckpt), "--device", "cpu"]
    one = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *common, "--output", str(tmp_path / "1.json")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "evaluate.py"), *common, "--output", str(tmp_path / "2.json")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert two.returncode == 0, two.stderr
    r1 = json.loads((tmp_path / "1.json").read_text())
    r2 = json.loads((tmp_path / "2.json").read_text())
    assert r2["device"]["world_size"] == 2 and r1["device"]["world_size"] == 1
    assert r1["metrics"] == r2["metrics"] and r2["metrics"]["num_images"] == 6
    assert two.stdout.count("dice_nvidia") == 1  # only rank 0 prints


def _direct_scores(ckpts, data_dir, val, options):
    """The challenge and instance scores computed here, outside evaluate.py, from the same probabilities."""
    from unet.data.datasets import load_dataset
    from unet.device import setup_device
    from unet.prediction.ensemble import load_ensemble
    from unet.metrics.instances import score_instances
    from unet.prediction.instances import instance_stack
    from unet.metrics.isbi import isbi_thinned_scores
    from unet.prediction.predictor import predict_probabilities
    model, _ = load_ensemble(ckpts)
    slices = load_dataset(str(data_dir)).subset(val)
    dev = setup_device("cpu")
    cell = np.stack([predict_probabilities(model, im, dev)[1].numpy() for im in slices.images])
    truth = np.stack([np.asarray(lab) == 1 for lab in slices.labels])
    return isbi_thinned_scores(cell, truth), score_instances(instance_stack(cell, options), truth)


def test_challenge_and_instance_scores(tmp_path, data_dir, capsys):
    from unet.prediction.instances import InstanceOptions
    ckpt = make_ckpt(tmp_path / "a.pt", fold=0, folds=2, data_dir=str(data_dir))
    code, out, err = run_cli(["--ckpt", ckpt, "--output", tmp_path / "r.json", "--device", "cpu", "--per-image",
                              "--instance-h", "0.1", "--instance-smooth", "0.5"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    m = r["metrics"]
    options = InstanceOptions(seed_h=0.1, smooth=0.5)
    assert r["instance_options"] == {"threshold": 0.5, "seeds": "hminima", "seed_h": 0.1, "smooth": 0.5, "fill": True}
    thinned, instances = _direct_scores([ckpt], data_dir, r["fold"]["val_indices"], options)
    for k in ("v_rand_thinned", "v_rand_threshold", "v_info_thinned", "v_info_threshold"):
        assert m[k] == pytest.approx(thinned[k], abs=1e-12), k
    assert m["v_rand_instances"] == pytest.approx(instances["v_rand"], abs=1e-12)
    assert m["v_info_instances"] == pytest.approx(instances["v_info"], abs=1e-12)
    curves = r["thinned_curves"]
    assert len(curves["thresholds"]) == 11 and curves["thresholds"][3] == 0.30000000000000004
    assert curves["v_rand"] == pytest.approx(thinned["v_rand_curve"], abs=1e-12)
    assert max(curves["v_rand"]) == pytest.approx(m["v_rand_thinned"], abs=1e-15)
    assert all("v_rand_thinned" in row and "v_rand_instances" in row for row in r["per_image"])
    for k in ("v_rand_thinned", "v_info_thinned", "v_rand_instances", "v_info_instances"):
        assert any(line.split()[:1] == [k] for line in out.splitlines()), k


def test_scores_can_be_skipped(tmp_path, data_dir, capsys):
    ckpt = make_ckpt(tmp_path / "a.pt", fold=0, folds=2, data_dir=str(data_dir))
    code, out, err = run_cli(["--ckpt", ckpt, "--output", tmp_path / "r.json", "--device", "cpu", "--no-thinned",
                              "--no-instances"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["metrics"]) == set(METRIC_KEYS) and "thinned_curves" not in r and "instance_options" not in r


def test_cv_table_has_the_challenge_and_instance_columns(tmp_path, data_dir, capsys):
    paths = [make_ckpt(tmp_path / f"f{k}.pt", seed=k, fold=k, folds=2, data_dir=str(data_dir)) for k in (0, 1)]
    code, out, err = run_cli(["--ckpt", *paths, "--output", tmp_path / "cv.json", "--device", "cpu"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "cv.json").read_text())
    header = r["cv"]["markdown"].splitlines()[0]
    for title in ("V_Rand (thinned)", "V_Info (thinned)", "V_Rand (instances)", "V_Info (instances)"):
        assert title in header
    v = np.array([run["metrics"]["v_rand_thinned"] for run in r["runs"]])
    assert r["cv"]["mean"]["v_rand_thinned"] == pytest.approx(v.mean(), rel=1e-12)


def test_ensemble_scores_the_mean_probability(tmp_path, data_dir, capsys):
    from unet.device import setup_device
    from unet.prediction.ensemble import load_ensemble
    from unet.evaluation.slices import evaluate_slices
    from unet.data.datasets import load_dataset
    from unet.prediction.instances import InstanceOptions
    paths = [make_ckpt(tmp_path / f"s{k}.pt", seed=k, fold=1, folds=3, data_dir=str(data_dir)) for k in (0, 1)]
    code, out, err = run_cli(["--ckpt", *paths, "--ensemble", "--output", tmp_path / "e.json", "--device", "cpu"],
                             capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["ensemble"] == [str(p) for p in paths] and "ensemble of 2 UNets" in out and "cv" not in r
    model, _ = load_ensemble(paths)
    expect = evaluate_slices(model, load_dataset(str(data_dir)).subset(r["fold"]["val_indices"]),
                             setup_device("cpu"), thinned=True, instances=InstanceOptions())
    expect.pop("thinned_curves")
    assert r["metrics"] == pytest.approx(expect, abs=1e-12)
    first = evaluate_slices(load_ensemble(paths[:1])[0], load_dataset(str(data_dir)).subset(r["fold"]["val_indices"]),
                            setup_device("cpu"))
    assert first["dice_nvidia"] != r["metrics"]["dice_nvidia"]  # the second model counted


@pytest.mark.parametrize("case", ["folds", "padding"])
def test_ensemble_refuses_members_that_differ_naming_both(case, tmp_path, data_dir, capsys):
    a = make_ckpt(tmp_path / "a.pt", fold=0, folds=3, data_dir=str(data_dir))
    if case == "folds":
        b = make_ckpt(tmp_path / "b.pt", seed=1, fold=1, folds=3, data_dir=str(data_dir))
        expect = "were trained on different data or folds"
    else:
        b = tmp_path / "b.pt"
        save_checkpoint(b, UNet(base_filters=4, depth=3, padding="valid"), args={"fold": 0, "folds": 3,
                                                                                 "data_dir": str(data_dir)})
        expect = "padding same vs valid"
    code, out, err = run_cli(["--ckpt", a, b, "--ensemble", "--device", "cpu"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expect in lines[0], err
    assert str(a) in lines[0] and str(b) in lines[0]


def test_tile_size_over_budget_is_one_line(tmp_path, data_dir, capsys):
    ckpt = make_ckpt(tmp_path / "a.pt", fold=0, folds=3, data_dir=str(data_dir))
    code, out, err = run_cli(["--ckpt", ckpt, "--device", "cpu", "--tile-size", "1000000"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("evaluate.py: error: --tile-size 1000000 needs")
    assert "largest tile size allowed for this model is" in lines[0]
