"""datasets/isbi2012.py without the network: local file:// mirrors and a failing opener."""
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import tifffile

from script_modules import load_script
from unet.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "datasets" / "isbi2012.py"


@pytest.fixture(scope="module")
def isbi_script():
    return load_script(SCRIPT, "isbi2012_download")


def _mirror(folder: Path, shape=(30, 512, 512)) -> str:
    folder.mkdir()
    for name in ("train-volume.tif", "train-labels.tif", "test-volume.tif"):
        # Compressed zeros keep the fake 30 x 512 x 512 stacks tiny on disk.
        tifffile.imwrite(folder / name, np.zeros(shape, np.uint8), photometric="minisblack",
                         compression="zlib")
    return folder.as_uri()


def test_downloads_from_mirror_and_checks(tmp_path, isbi_script):
    url = _mirror(tmp_path / "mirror")
    paths = [p for p, _ in isbi_script.fetch_all(tmp_path / "out", url)]
    assert [p.name for p in paths] == ["train-volume.tif", "train-labels.tif", "test-volume.tif"]
    assert tifffile.imread(paths[0]).shape == (30, 512, 512)
    # Only the three stacks: no temporary files left behind.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(isbi_script.FILES)


def test_wrong_shape_is_rejected_and_not_kept(tmp_path, isbi_script):
    url = _mirror(tmp_path / "mirror", shape=(3, 64, 64))
    with pytest.raises(UserError, match=r"mirror/train-volume.tif: has 3 slices of 64x64 with 1 channel\(s\), expected 30 slices of "
                                        r"512x512 grayscale"):
        isbi_script.fetch_all(tmp_path / "out", url)
    assert not (tmp_path / "out").exists()  # nothing kept, not even the folder it made


def test_offline_gives_one_line_error(tmp_path, isbi_script):
    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(UserError, match=r"train-volume.tif: download failed \(\[Errno -3\] Temporary failure in "
                                        r"name resolution\); check the internet connection") as err:
        isbi_script.fetch_all(tmp_path / "out", opener=offline)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing kept, not even the folder it made


def test_cli_exit_status_and_message(tmp_path):
    missing = (tmp_path / "nowhere").as_uri()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data-dir", str(tmp_path / "out"), "--base-url", missing],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: file:") and "download failed" in lines[0]


def test_real_stacks_pass_the_check(isbi_dir, isbi_script):
    for name in isbi_script.FILES:
        isbi_script.check_stack(isbi_dir / name)


@pytest.mark.slow  # subprocesses
def test_prints_sha256_of_what_was_saved_and_refuses_another_digest(tmp_path):
    url = _mirror(tmp_path / "mirror")
    import hashlib
    want = {n: hashlib.sha256((tmp_path / "mirror" / n).read_bytes()).hexdigest() for n in
            ("train-volume.tif", "train-labels.tif", "test-volume.tif")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data-dir", str(tmp_path / "out"), "--base-url", url,
                           "--sha256", f"train-volume.tif={want['train-volume.tif']}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"ok {tmp_path / 'out' / n} sha256 {d}" for n, d in want.items()]
    wrong = "0" * 64
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data-dir", str(tmp_path / "other"), "--base-url", url,
                           "--sha256", f"test-volume.tif={wrong}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"test-volume.tif: SHA-256 is {want['test-volume.tif']}, not the {wrong} "
                                        f"given with --sha256; the file was not kept")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["train-labels.tif", "train-volume.tif"]


def test_size_read_is_capped(tmp_path, isbi_script, monkeypatch):
    monkeypatch.setattr(isbi_script, "MAX_BYTES", 1000)
    monkeypatch.setattr(isbi_script, "CHUNK_BYTES", 100)
    url = _mirror(tmp_path / "mirror")
    with pytest.raises(UserError, match=r"train-volume.tif: more than 1,000 bytes; an ISBI 2012 stack is about 8 MB"):
        isbi_script.fetch_all(tmp_path / "out", url)
    assert not (tmp_path / "out").exists()  # nothing kept, not even the folder it made
