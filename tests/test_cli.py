"""unet.cli.common: the shared instance flags, the tile-size budget check and one error line under torchrun."""
import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unet.cli.common import add_options, options_from, run
from unet.errors import UserError
from unet.prediction.instances import InstanceOptions

REPO = Path(__file__).resolve().parents[1]


def parser():
    p = argparse.ArgumentParser(prog="tool.py")
    add_options(p, InstanceOptions)
    return p


def test_instance_flags_default_to_instance_options_and_round_trip():
    assert options_from(parser().parse_args([]), InstanceOptions) == InstanceOptions()
    args = parser().parse_args(["--instance-threshold", "0.3", "--instance-seeds", "distance", "--instance-h", "3",
                                "--instance-smooth", "0", "--no-instance-fill"])
    assert dataclasses.asdict(options_from(args, InstanceOptions)) == {"threshold": 0.3, "seeds": "distance", "seed_h": 3.0,
                                                          "smooth": 0.0, "fill": False}


@pytest.mark.parametrize("flag, value, message", [("--instance-threshold", "1", "must be in [0, 1), got 1"),
                                                  ("--instance-h", "0", "must be a number > 0, got 0"),
                                                  ("--instance-h", "nan", "must be a number > 0, got nan"),
                                                  ("--instance-smooth", "-1", "must be a number >= 0, got -1"),
                                                  ("--instance-seeds", "blobs", "invalid choice: 'blobs'")])
def test_bad_instance_flags_fail_when_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args([flag, value])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"tool.py: error: argument {flag}: {message}")


def _failing(args):
    raise UserError("data/x.tif: no\nsuch file")


@pytest.mark.parametrize("rank, lines", [("0", ["tool.py: error: data/x.tif: no such file"]), ("1", [])])
def test_only_rank_0_prints_a_user_error(rank, lines, monkeypatch, capsys):
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as e:
        run(_failing, argparse.ArgumentParser(prog="tool.py"), [])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == lines and out == ""


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_only_rank_0_prints_argparse_errors(rank, printed, monkeypatch, capsys):
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as e:
        run(_failing, parser(), ["--instance-h", "0"])
    assert e.value.code == 2
    assert ("argument --instance-h" in capsys.readouterr().err) is printed


@pytest.mark.slow
@pytest.mark.parametrize("argv, expect", [(["--data-dir", "{tmp}/nowhere"], "nowhere"),
                                          (["--tile-size", "1000000"], "--tile-size 1000000")])
def test_torchrun_prints_one_error_line(tmp_path, argv, expect):
    """2 CPU ranks of evaluate.py, a bad data path or tile size: exactly one error line, non-zero exit."""
    from unet.checkpoint import save_checkpoint
    from unet.model import UNet
    save_checkpoint(tmp_path / "a.pt", UNet(base_filters=4, depth=3, padding="same"), args={"fold": None})
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "evaluate.py"), "--ckpt", str(tmp_path / "a.pt"), "--device", "cpu", *argv],
                       capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in p.stderr.splitlines() if "evaluate.py: error:" in line]
    assert p.returncode != 0 and len(errors) == 1 and expect in errors[0], p.stderr[-3000:]
