"""Write failures: one UserError naming the target and the cause, the old file intact, no temporary left."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from unet.atomic import _UMASK, _host_tag, atomic_path, atomic_write, make_folder, remove_stale_temporaries
from unet.errors import UserError
from unet.io.writers import StackWriter
from unet.run_log import MetricsLog, write_json

REPO = Path(__file__).resolve().parents[1]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writer_failing_halfway_keeps_old_file_byte_identical(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"old": 1})
    before = target.read_bytes()

    def half_then_fail(f):
        f.write(b'{"new": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match=rf"^cannot write {target}: No space left on device; the disk is full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == before and _listing(tmp_path) == ["summary.json"]
    with pytest.raises(ZeroDivisionError):  # not a write failure: passed on as it is, still cleaned up
        atomic_write(target, lambda f: 1 / 0)
    assert target.read_bytes() == before and _listing(tmp_path) == ["summary.json"]


def test_stack_writer_writes_only_through_a_temporary(tmp_path):
    # A StackWriter that wrote into the final path would show the file before commit and leave it on abort.
    out = tmp_path / "masks.tif"
    out.write_bytes(b"old masks")
    with pytest.raises(RuntimeError):
        with StackWriter(out) as w:
            w.append(np.zeros((2, 8, 8), np.uint8))
            assert out.read_bytes() == b"old masks"
            raise RuntimeError("prediction failed")
    assert out.read_bytes() == b"old masks" and _listing(tmp_path) == ["masks.tif"]
    with StackWriter(out) as w:
        w.append(np.full((3, 8, 8), 7, np.uint8))
        assert out.read_bytes() == b"old masks"
    import tifffile
    np.testing.assert_array_equal(tifffile.imread(out), np.full((3, 8, 8), 7, np.uint8))
    assert _listing(tmp_path) == ["masks.tif"]


def test_stack_writer_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "masks.tif"
    with pytest.raises(UserError, match=rf"^cannot write {out}: No space left on device"):
        with StackWriter(out) as w:
            monkeypatch.setattr(w._tif, "write", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
            w.append(np.zeros((1, 8, 8), np.uint8))
    assert _listing(tmp_path) == []


def test_path_under_a_regular_file(tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(UserError, match=r"^--model-dir .*plain/run: cannot create the folder \(Not a directory; "
                                        r"a part of the path is a file, not a folder\)$"):
        make_folder(tmp_path / "plain" / "run", "--model-dir")
    assert make_folder(tmp_path / "a" / "b", "--model-dir").is_dir()
    with pytest.raises(UserError, match=r"cannot write .*plain/out.json: folder .*plain is a file, not a folder"):
        write_json(tmp_path / "plain" / "out.json", {})


def _read_only_folder(folder: Path):
    """Make ``folder`` refuse new files, also for root (who ignores mode bits): chattr +i where possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("running as root and chattr +i is not available here: cannot make a folder unwritable")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_unwritable_folder_is_one_line_and_old_file_kept(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    write_json(folder / "summary.json", {"old": 1})
    before = (folder / "summary.json").read_bytes()
    undo = _read_only_folder(folder)
    try:
        with pytest.raises(UserError, match=r"^cannot write .*summary.json: (Permission denied; no permission"
                                            r"|Operation not permitted; the operation is not permitted)"):
            write_json(folder / "summary.json", {"new": 2})
    finally:
        undo()
    assert (folder / "summary.json").read_bytes() == before and _listing(folder) == ["summary.json"]


_FSIZE_CHILD = textwrap.dedent("""
    import resource, signal, sys
    import torch
    from unet.checkpoint import save_checkpoint
    from unet.errors import UserError
    from unet.model import UNet
    from unet.run_log import write_json
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    target = sys.argv[1]
    try:
        if target.endswith(".bin"):  # a saver that hides the OSError (torch's zip writer given a path name)
            from unet.atomic import atomic_path
            with atomic_path(target) as tmp:
                torch.save(torch.zeros(100_000), str(tmp))
        elif target.endswith(".pt"):
            save_checkpoint(target, UNet(base_filters=8, depth=3, padding="same"))
        else:
            write_json(target, {"values": list(range(20000))})
    except UserError as e:
        print(e)
        sys.exit(2)
""")


@pytest.mark.parametrize("name", ["last.pt", "summary.json", "weights.bin"])
def test_file_size_limit_is_one_line_and_old_file_kept(tmp_path, name):
    target = tmp_path / name
    target.write_bytes(b"previous content")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(target)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stdout.strip() == (f"cannot write {target}: File too large; the file-size limit was reached "
                                  f"(ulimit -f, or the file system's largest file)")
    assert target.read_bytes() == b"previous content" and _listing(tmp_path) == [name]


def test_stale_temporaries_of_dead_writers_removed_and_only_those(tmp_path):
    target = tmp_path / "last.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited: its pid is free (or reused; then only age counts)
    host = _host_tag()
    files = {"stale": f".last.pt.{host}.{dead_pid}.k2j4h5g6.tmp.pt",         # this target, dead writer: removed
             "live": f".last.pt.{host}.{os.getpid()}.a1b2c3d4.tmp.pt",       # this target, live writer: kept
             "other_target": f".best.pt.{host}.{dead_pid}.x9y8z7w6.tmp.pt",  # another target: kept until it is written
             "user": ".last.pt.notes"}                                        # looks alike, not ours: kept
    for name in files.values():
        (tmp_path / name).write_bytes(b"half a checkpoint")
    assert remove_stale_temporaries(target) == [tmp_path / files["stale"]]
    assert _listing(tmp_path) == sorted([files["live"], files["other_target"], files["user"]])
    with atomic_path(tmp_path / "best.pt") as tmp:  # the next write to best.pt removes best.pt's stale one
        tmp.write_bytes(b"best")
    assert _listing(tmp_path) == sorted([files["live"], files["user"], "best.pt"])


def test_stale_temporary_of_a_sigkilled_writer_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "summary.json"
    child = textwrap.dedent(f"""
        import os, signal
        from unet.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = subprocess.run([sys.executable, "-c", child], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == -9
    left = _listing(tmp_path)
    assert len(left) == 1 and left[0].startswith(".summary.json.")
    write_json(target, {"ok": True})
    assert _listing(tmp_path) == ["summary.json"]


def test_metrics_log_torn_last_line_dropped_on_resume_with_a_note(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 0.5}\n{"kind": "train", "step": 2, "loss": 0.4}\n'
                    '{"kind": "val", "step": 2, "val": {"dice')
    log = MetricsLog(path, resume_step=2)
    assert "dropped a torn last line" in capsys.readouterr().err
    assert [r["step"] for r in log.read()] == [1, 2]
    log.write({"kind": "train", "step": 3, "loss": 0.3})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        MetricsLog(path, resume_step=2)


def test_published_file_gets_the_umask_mode_and_leaves_the_umask_alone(tmp_path):
    old = os.umask(0o027)
    try:
        write_json(tmp_path / "summary.json", {"a": 1})
        assert os.umask(0o027) == 0o027  # publishing leaves the process umask as it was
    finally:
        os.umask(old)
    # The mode follows the umask read at import (the process's own), not mkstemp's owner-only 0600.
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o666 & ~_UMASK


def test_file_sha256_equals_hashlib_over_the_bytes_across_block_boundaries(tmp_path):
    import hashlib
    from unet.atomic import file_sha256
    data = bytes(range(256)) * 8193  # 2 MiB + 256 bytes: two full 1 MiB blocks and a partial one
    for name, content in [("empty", b""), ("big", data)]:
        (tmp_path / name).write_bytes(content)
        assert file_sha256(tmp_path / name) == hashlib.sha256(content).hexdigest()
