"""A block-wise infer.py run whose output disk fills up mid-run (issue 20, "a read-only or full disk mid-run"): one
line naming the output, no traceback, the finished blocks kept and recorded, nothing recorded that is not fully
written, and ``--resume`` (space freed) finishes with the outputs of an uninterrupted run bit for bit.

The full disk is made where a real one bites: zarr's local store writing a chunk file (``zarr.storage._local._put``)
raises ENOSPC; a file system remounted read-only the same way with EROFS. (A read-only folder, chmod, cannot stand in:
the tests run as root, whom permissions do not stop.)"""
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from unet.checkpoint import save_checkpoint
from unet.cli.commands import infer
from infer_runs import read_volume, run_infer, write_em_volume
from tiny_models import balanced_unet

SHAPE = (3, 40, 56)
BLOCKS = ["--chunks", "16", "--block-size", "16"]  # 3 x 4 blocks per slice, 36 in all; one chunk per block
NUM_BLOCKS = 36
FINISHED = 7  # blocks 0..6 are written and recorded before the disk fills

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions; shared cores (conftest)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """An OME-Zarr input, a 'same' checkpoint and the outputs of an uninterrupted block-wise run."""
    root = tmp_path_factory.mktemp("disk_full")
    write_em_volume(root / "em.ome.zarr", SHAPE)
    save_checkpoint(root / "same.pt", balanced_unet("same"))
    run_infer(root / "same.pt", *_args(root, root / "ref"))
    return {"root": root, "masks": read_volume(root / "ref/m.zarr"), "probs": read_volume(root / "ref/p.zarr")}


def _args(root: Path, out: Path) -> list:
    out.mkdir(exist_ok=True)
    return ["--input", root / "em.ome.zarr", "--output", out / "m.zarr", "--probabilities", out / "p.zarr",
            "--tile-size", "16", "--tile-batch", "1", *BLOCKS]


def _failing_after(monkeypatch, chunks: int, code: int) -> list:
    """Chunk-file writes after the first ``chunks`` fail with ``code`` (ENOSPC: a full disk); returns the paths
    tried."""
    tried = []
    real_put = zarr.storage._local._put

    def put(path, value, exclusive=False):
        if Path(path).name.isdigit():  # a chunk file (v2 keys "z/y/x"); metadata is written before any block
            tried.append(Path(path))
            if len(tried) > chunks:
                raise OSError(code, os.strerror(code), str(path))
        return real_put(path, value, exclusive)

    monkeypatch.setattr(zarr.storage._local, "_put", put)
    return tried


def _partial(container: Path) -> np.ndarray:
    """What the interrupted run left in ``<container>.partial`` (the OME-Zarr level 0)."""
    return zarr.open_group(str(container) + ".partial", mode="r")["0"][:]


@pytest.mark.parametrize("code, problem", [
    (errno.ENOSPC, "No space left on device; the disk is full; free space or write elsewhere"),
    (errno.EROFS, "Read-only file system; the file system is read-only; choose another folder"),
])
def test_disk_failing_mid_run_keeps_finished_blocks_and_resume_completes(data, tmp_path, monkeypatch, capsys, code, problem):
    args = _args(data["root"], tmp_path)
    capsys.readouterr()
    with monkeypatch.context() as m:
        # Block b writes its mask chunk, then its probability chunk: the disk fails between block 7's two.
        tried = _failing_after(m, 2 * FINISHED + 1, code)
        code = _exit_code(infer, ["--ckpt", str(data["root"] / "same.pt"), *map(str, args), "--device", "cpu",
                                  "--precision", "fp32", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if not line.startswith("predicting ")]
    assert lines == [f"infer.py: error: cannot write {tmp_path / 'p.zarr'}: {problem}"]
    assert len(tried) == 2 * FINISHED + 2 and tried[-1].is_relative_to(tmp_path / "p.zarr.partial")
    records = tmp_path / "m.zarr.unet_blocks" / "done"
    assert sorted(int(p.name) for p in records.iterdir()) == list(range(FINISHED))  # block 7 is not recorded
    # The recorded blocks are whole in both outputs: the first 7 chunks of slice 0's 3 x 4 blocks.
    masks, probs = _partial(tmp_path / "m.zarr"), _partial(tmp_path / "p.zarr")
    for b in range(FINISHED):
        box = np.s_[0, 16 * (b // 4):16 * (b // 4 + 1), 16 * (b % 4):16 * (b % 4 + 1)]
        np.testing.assert_array_equal(masks[box], data["masks"][box])
        np.testing.assert_array_equal(probs[box], data["probs"][box])
    assert not probs[0, 16:32, 48:56].any()  # block 7's probabilities never reached the disk
    assert not masks[1:].any() and not probs[1:].any()

    run_infer(data["root"] / "same.pt", *args, "--resume")  # space freed (or rw again): the same command + --resume
    assert f"blocks: {NUM_BLOCKS - FINISHED} of {NUM_BLOCKS} predicted" in capsys.readouterr().out
    np.testing.assert_array_equal(read_volume(tmp_path / "m.zarr"), data["masks"])
    np.testing.assert_array_equal(read_volume(tmp_path / "p.zarr"), data["probs"])  # bit for bit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zarr", "p.zarr"]


def _exit_code(command, argv) -> int:
    """The status a console script ends with, whether it returns it or raises SystemExit."""
    try:
        return command(argv)
    except SystemExit as e:
        return e.code
