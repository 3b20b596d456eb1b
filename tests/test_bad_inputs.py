"""A table of bad inputs and faults against train.py, evaluate.py, infer.py, export.py and datasets/isbi2012.py.

Every case must end with: a non-zero exit, no traceback, a last stderr line naming the offending file or flag,
no new or half-written file anywhere in its folder (old outputs byte-identical), and inputs untouched.

Importing torch costs a few seconds per process, so the cases run in one runner subprocess that calls each
command's entry point in turn (stderr captured per case, SystemExit and uncaught exceptions recorded as a
real process would show them); a few cases run the real scripts as their own processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile
import torch

from unet.checkpoint import save_checkpoint
from unet.model import UNet

REPO = Path(__file__).resolve().parents[1]
ISBI = Path(os.environ.get("ISBI_DIR", REPO.parent / "shared" / "isbi2012"))

RUNNER = textwrap.dedent("""
    import contextlib, importlib.util, io, json, resource, signal, sys, traceback
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the size limit fails with EFBIG instead
    from unet.cli import commands as cli
    spec = importlib.util.spec_from_file_location("isbi2012_download", sys.argv[3])
    download = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(download)
    entry = {"train": cli.train, "evaluate": cli.evaluate, "infer": cli.infer, "export": cli.export,
             "download": download.main}
    results = {}
    for case in json.load(open(sys.argv[1])):
        err, out = io.StringIO(), io.StringIO()
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if case["fsize"]:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case["fsize"], hard))
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    rc = entry[case["cmd"]](case["argv"]) or 0
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else 1
                except BaseException:
                    traceback.print_exc()
                    rc = 1
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        results[case["id"]] = {"rc": rc, "stderr": err.getvalue()}
    json.dump(results, open(sys.argv[2], "w"))
""")

SCRIPTS = {"train": "train.py", "evaluate": "evaluate.py", "infer": "infer.py", "export": "export.py",
           "download": "datasets/isbi2012.py"}
TINY_TRAIN = ["--base-filters", "4", "--depth", "2", "--padding", "same", "--input-size", "32", "--batch-size", "2",
              "--workers", "0", "--no-progress", "--max-steps", "2", "--log-every", "1"]


@dataclass
class Case:
    """One bad input: ``argv`` may use {d} (the case's own folder) and {w} (shared, read-only inputs)."""

    id: str
    cmd: str
    argv: list[str]
    names: str                                   # the last stderr line must contain this (a file or flag)
    setup: Callable[[Path, Path], None] | None = None
    fsize: int = 0                               # RLIMIT_FSIZE for the run (0: unlimited)
    read_only: str | None = None                 # folder (relative to {d}) made unwritable, even for root
    standalone: bool = False                     # run the real script as its own process
    may_create: tuple[str, ...] = ()             # files the run may leave complete (e.g. the log of done steps);
                                                 # "dir/": anything in that folder
    marks: tuple = field(default_factory=tuple)


# ------------------------------------------------------------------------------------------ file makers

def _stack(path: Path, n=6, size=64, dtype=np.uint8, seed=0, **kw) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = rng.random((n, size, size))
    arr = (arr * 255).astype(dtype) if dtype == np.uint8 else arr.astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr, **({"photometric": "minisblack"} | kw))
    return arr


def _labels(path: Path, n=6, size=64, values=(0, 255)):
    rng = np.random.default_rng(1)
    tifffile.imwrite(path, rng.choice(np.array(values, np.uint8), (n, size, size)), photometric="minisblack")


def _isbi(folder: Path, n=6, **kw):
    _stack(folder / "train-volume.tif", n, **kw)
    _labels(folder / "train-labels.tif", n)


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _truncated_volume(path: Path):
    """The first half of the real test-volume.tif when present, else of a generated ImageJ stack."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if (ISBI / "test-volume.tif").is_file():
        data = (ISBI / "test-volume.tif").read_bytes()
    else:
        _stack(path, 30, 128, imagej=True)
        data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _nan_stack(path: Path, n=6, bad=np.nan):
    arr = _stack(path, n, dtype=np.float32)
    arr[2].flat[::50] = bad  # 2 % of slice 2
    tifffile.imwrite(path, arr, photometric="minisblack")


def _ckpt(path: Path, poison: str | None = None):
    torch.manual_seed(0)
    model = UNet(base_filters=4, depth=2, padding="same")
    if poison == "nan":
        with torch.no_grad():
            next(model.parameters())[0].fill_(float("nan"))
    args = {"data_dir": None, "fold": 0, "folds": 5, "fold_scheme": "disjoint", "seed": 0}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, step=2, args=args)
    if poison == "pickle":
        ckpt = torch.load(path, weights_only=True)
        ckpt["hook"] = os.system  # a global that would run code when unpickled
        torch.save(ckpt, path)
    elif poison == "truncated":
        _truncate(path)
    elif poison == "foreign":
        torch.save(model.state_dict(), path)


def _file(path: Path, text="not a folder"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _folder(path: Path):
    path.mkdir(parents=True, exist_ok=True)


def _mirror(folder: Path, shape=(30, 512, 512), truncate=False):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train-volume.tif", "train-labels.tif", "test-volume.tif"):
        tifffile.imwrite(folder / name, np.zeros(shape, np.uint8), photometric="minisblack", compression="zlib")
        if truncate:
            _truncate(folder / name)


def _old_output(path: Path):
    _stack(path, 2, 16)


SHA_OK = "0" * 64

# ------------------------------------------------------------------------------------------ the table

CASES = [
    # ---- train.py: data
    Case("train-data-dir-missing", "train", ["--data-dir", "{d}/nowhere", "--model-dir", "{d}/m"], "nowhere",
         standalone=True),
    Case("train-data-dir-is-file", "train", ["--data-dir", "{d}/f.txt", "--model-dir", "{d}/m"], "f.txt",
         setup=lambda d, w: _file(d / "f.txt")),
    Case("train-data-dir-empty", "train", ["--data-dir", "{d}/data", "--model-dir", "{d}/m"], "data",
         setup=lambda d, w: _folder(d / "data")),
    Case("train-labels-missing", "train", ["--data-dir", "{d}", "--model-dir", "{d}/m"], "train-labels.tif",
         setup=lambda d, w: _stack(d / "train-volume.tif")),
    Case("train-volume-truncated", "train", ["--data-dir", "{d}", "--model-dir", "{d}/m"], "train-volume.tif: page 1",
         setup=lambda d, w: (_isbi(d, 6, imagej=True), _truncate(d / "train-volume.tif"))),
    Case("train-labels-truncated", "train", ["--data-dir", "{d}", "--model-dir", "{d}/m"], "train-labels.tif",
         setup=lambda d, w: (_isbi(d), _truncate(d / "train-labels.tif"))),
    Case("train-volume-nan", "train", ["--data-dir", "{d}", "--model-dir", "{d}/m"], "train-volume.tif: slice 2",
         setup=lambda d, w: (_isbi(d), _nan_stack(d / "train-volume.tif"))),
    Case("train-volume-inf", "train", ["--data-dir", "{d}", "--model-dir", "{d}/m"], "train-volume.tif: slice 2",
         setup=lambda d, w: (_isbi(d), _nan_stack(d / "train-volume.tif", bad=np.inf))),
    Case("train-labels-three-values", "train", ["--data-dir", "{d}", "--model-dir", "{d}/m"], "train-labels.tif",
         setup=lambda d, w: (_isbi(d), _labels(d / "train-labels.tif", values=(0, 1, 2)))),
    Case("train-labels-fewer-slices", "train", ["--data-dir", "{d}", "--model-dir", "{d}/m"], "train-labels.tif",
         setup=lambda d, w: (_isbi(d), _labels(d / "train-labels.tif", n=5))),
    Case("train-labels-other-size", "train", ["--data-dir", "{d}", "--model-dir", "{d}/m"], "train-labels.tif",
         setup=lambda d, w: (_isbi(d), _labels(d / "train-labels.tif", size=32))),
    Case("train-volume-rgb", "train", ["--data-dir", "{d}", "--model-dir", "{d}/m"], "train-volume.tif",
         setup=lambda d, w: (_isbi(d), tifffile.imwrite(d / "train-volume.tif",
                                                        np.zeros((6, 64, 64, 3), np.uint8), photometric="rgb"))),
    Case("train-volume-int32", "train", ["--data-dir", "{d}", "--model-dir", "{d}/m"], "train-volume.tif",
         setup=lambda d, w: (_isbi(d), _stack(d / "train-volume.tif", dtype=np.int32))),
    Case("train-volume-garbage", "train", ["--data-dir", "{d}", "--model-dir", "{d}/m"], "train-volume.tif",
         setup=lambda d, w: (_isbi(d), _file(d / "train-volume.tif", "garbage" * 9))),
    Case("train-images-folder-empty", "train", ["--data-dir", "{d}/data", "--model-dir", "{d}/m"], "images",
         setup=lambda d, w: (_folder(d / "data" / "images"), _folder(d / "data" / "labels"))),
    # ---- train.py: own data, label kinds, fine-tuning (issue 21)
    Case("train-own-labels-other-size", "train",
         TINY_TRAIN + ["--train-images", "{d}/img.tif", "--train-labels", "{d}/lab.tif", "--model-dir", "{d}/m"],
         "lab.tif: label slice 0 is 32x32 but image slice 0 of",
         setup=lambda d, w: (_stack(d / "img.tif"), _labels(d / "lab.tif", size=32))),
    Case("train-own-labels-out-of-range", "train",
         TINY_TRAIN + ["--train-images", "{d}/img.tif", "--train-labels", "{d}/lab.tif", "--label-kind", "classes",
                       "--num-classes", "3", "--model-dir", "{d}/m"], "lab.tif: label values {3, 4} are outside 0..2",
         setup=lambda d, w: (_stack(d / "img.tif"), _labels(d / "lab.tif", values=(0, 1, 2, 3, 4)))),
    Case("train-own-labels-all-ignore", "train",
         TINY_TRAIN + ["--train-images", "{d}/img.tif", "--train-labels", "{d}/lab.tif", "--ignore-label", "9",
                       "--model-dir", "{d}/m"], "lab.tif: every label pixel has the ignore value",
         setup=lambda d, w: (_stack(d / "img.tif"), _labels(d / "lab.tif", values=(9,)))),
    Case("train-init-other-architecture", "train",
         TINY_TRAIN + ["--base-filters", "8", "--init-from", "{w}/good.pt", "--model-dir", "{d}/m"],
         "good.pt: another architecture than this run's (layer downs.0.conv.0.weight"),
    # ---- train.py: flags and the model folder
    Case("train-tile-size-huge", "train", TINY_TRAIN + ["--tile-size", "1000000", "--model-dir", "{d}/m"],
         "--tile-size"),
    Case("train-max-steps-zero", "train", ["--max-steps", "0", "--model-dir", "{d}/m"], "--max-steps"),
    Case("train-batch-size-negative", "train", ["--batch-size", "-1", "--model-dir", "{d}/m"], "--batch-size"),
    Case("train-padding-unknown", "train", ["--padding", "mirror", "--model-dir", "{d}/m"], "--padding"),
    Case("train-input-size-invalid", "train", TINY_TRAIN[:6] + ["--padding", "valid", "--input-size", "33",
                                                              "--model-dir", "{d}/m"], "--input-size"),
    Case("train-resume-nothing", "train", TINY_TRAIN + ["--resume", "--model-dir", "{d}/m"], "--resume",
         setup=lambda d, w: _folder(d / "m")),
    Case("train-different-run", "train", TINY_TRAIN + ["--seed", "3", "--model-dir", "{d}/m"], "m holds a different run",
         setup=lambda d, w: shutil.copytree(w / "run", d / "m")),
    Case("train-last-pt-truncated", "train", TINY_TRAIN + ["--max-steps", "4", "--model-dir", "{d}/m"], "last.pt",
         setup=lambda d, w: (shutil.copytree(w / "run", d / "m"), _truncate(d / "m" / "last.pt"))),
    Case("train-model-dir-under-file", "train", TINY_TRAIN + ["--model-dir", "{d}/f.txt/m"], "f.txt",
         setup=lambda d, w: _file(d / "f.txt")),
    Case("train-model-dir-read-only", "train", TINY_TRAIN + ["--model-dir", "{d}/m"], "m/", read_only="m",
         setup=lambda d, w: _folder(d / "m")),
    Case("train-checkpoint-size-limit", "train", TINY_TRAIN + ["--model-dir", "{d}/m"], "last.pt", fsize=30_000,
         setup=lambda d, w: _folder(d / "m"), may_create=("m/metrics.jsonl", "m/tensorboard/")),
    # ---- evaluate.py
    Case("evaluate-ckpt-missing", "evaluate", ["--ckpt", "{d}/nope.pt"], "nope.pt", standalone=True),
    Case("evaluate-ckpt-truncated", "evaluate", ["--ckpt", "{d}/c.pt"], "c.pt",
         setup=lambda d, w: _ckpt(d / "c.pt", "truncated")),
    Case("evaluate-ckpt-pickle", "evaluate", ["--ckpt", "{d}/c.pt"], "c.pt was refused",
         setup=lambda d, w: _ckpt(d / "c.pt", "pickle")),
    Case("evaluate-ckpt-nan-weights", "evaluate", ["--ckpt", "{d}/c.pt"], "c.pt: weight",
         setup=lambda d, w: _ckpt(d / "c.pt", "nan")),
    Case("evaluate-ckpt-foreign", "evaluate", ["--ckpt", "{d}/c.pt"], "c.pt",
         setup=lambda d, w: _ckpt(d / "c.pt", "foreign")),
    Case("evaluate-data-truncated", "evaluate", ["--ckpt", "{w}/good.pt", "--data-dir", "{d}"], "train-volume.tif",
         setup=lambda d, w: (_isbi(d), _truncate(d / "train-volume.tif"))),
    Case("evaluate-data-nan", "evaluate", ["--ckpt", "{w}/good.pt", "--data-dir", "{d}"], "train-volume.tif: slice 2",
         setup=lambda d, w: (_isbi(d), _nan_stack(d / "train-volume.tif"))),
    Case("evaluate-output-missing-folder", "evaluate", ["--ckpt", "{w}/good.pt", "--data-dir", "{w}/isbi",
                                                        "--output", "{d}/no/r.json"], "r.json"),
    Case("evaluate-output-read-only", "evaluate", ["--ckpt", "{w}/good.pt", "--data-dir", "{w}/isbi",
                                                   "--output", "{d}/out/r.json"], "r.json", read_only="out",
         setup=lambda d, w: _folder(d / "out")),
    Case("evaluate-output-size-limit", "evaluate", ["--ckpt", "{w}/good.pt", "--data-dir", "{w}/isbi",
                                                    "--output", "{d}/r.json"], "r.json", fsize=300,
         setup=lambda d, w: _file(d / "r.json", '{"old": true}')),
    Case("evaluate-cv-dir-empty", "evaluate", ["--cv-dir", "{d}/runs"], "runs",
         setup=lambda d, w: _folder(d / "runs")),
    Case("evaluate-tile-size-invalid", "evaluate", ["--ckpt", "{w}/good.pt", "--data-dir", "{w}/isbi",
                                                    "--tile-size", "7"], "tile size"),
    Case("evaluate-tile-size-huge", "evaluate", ["--ckpt", "{w}/good.pt", "--data-dir", "{w}/isbi",
                                                 "--tile-size", "1000000"], "--tile-size"),
    # ---- infer.py
    Case("infer-input-truncated-volume", "infer", ["--ckpt", "{w}/good.pt", "--input", "{d}/test-volume.tif",
                                                   "--output", "{d}/masks.tif"], "test-volume.tif: page 1",
         setup=lambda d, w: _truncated_volume(d / "test-volume.tif"), standalone=True),
    Case("infer-input-nan", "infer", ["--ckpt", "{w}/good.pt", "--input", "{d}/in.tif", "--output", "{d}/masks.tif"],
         "in.tif: slice 2", setup=lambda d, w: _nan_stack(d / "in.tif")),
    Case("infer-input-missing", "infer", ["--ckpt", "{w}/good.pt", "--input", "{d}/in.tif",
                                          "--output", "{d}/masks.tif"], "in.tif"),
    Case("infer-input-int32", "infer", ["--ckpt", "{w}/good.pt", "--input", "{d}/in.tif", "--output", "{d}/masks.tif"],
         "in.tif", setup=lambda d, w: _stack(d / "in.tif", dtype=np.int32)),
    Case("infer-folder-one-file-truncated", "infer", ["--ckpt", "{w}/good.pt", "--input", "{d}/in",
                                                      "--output", "{d}/out"], "b.tif",
         setup=lambda d, w: (_stack(d / "in" / "a.tif", 2), _stack(d / "in" / "b.tif", 4, imagej=True),
                             _truncate(d / "in" / "b.tif"))),
    Case("infer-ckpt-nan-weights", "infer", ["--ckpt", "{d}/c.pt", "--input", "{w}/stack.tif",
                                             "--output", "{d}/masks.tif"], "c.pt: weight",
         setup=lambda d, w: _ckpt(d / "c.pt", "nan")),
    Case("infer-ckpt-pickle", "infer", ["--ckpt", "{d}/c.pt", "--input", "{w}/stack.tif",
                                        "--output", "{d}/masks.tif"], "c.pt was refused",
         setup=lambda d, w: _ckpt(d / "c.pt", "pickle")),
    Case("infer-output-read-only", "infer", ["--ckpt", "{w}/good.pt", "--input", "{w}/stack.tif",
                                             "--output", "{d}/out/masks.tif"], "masks.tif", read_only="out",
         setup=lambda d, w: _folder(d / "out")),
    Case("infer-output-size-limit", "infer", ["--ckpt", "{w}/good.pt", "--input", "{w}/stack.tif", "--overwrite",
                                              "--compression", "none", "--output", "{d}/masks.tif"], "masks.tif",
         fsize=4_000, setup=lambda d, w: _old_output(d / "masks.tif")),
    Case("infer-probabilities-missing-folder", "infer", ["--ckpt", "{w}/good.pt", "--input", "{w}/stack.tif",
                                                         "--output", "{d}/masks.tif", "--probabilities",
                                                         "{d}/no/p.tif"], "p.tif"),
    Case("infer-overlay-is-file", "infer", ["--ckpt", "{w}/good.pt", "--input", "{w}/stack.tif",
                                            "--output", "{d}/masks.tif", "--overlay", "{d}/f.txt"], "f.txt",
         setup=lambda d, w: _file(d / "f.txt")),
    Case("infer-output-exists", "infer", ["--ckpt", "{w}/good.pt", "--input", "{w}/stack.tif",
                                          "--output", "{d}/masks.tif"], "masks.tif",
         setup=lambda d, w: _old_output(d / "masks.tif")),
    Case("infer-export-removed", "infer", ["--ckpt", "{w}/good.pt", "--export", "{d}/m.pt2", "--tile-size", "32"],
         "--export"),
    # ---- export.py (programs; the bioimage.io package's bad inputs are in test_bioimageio.py)
    Case("export-pt2-read-only", "export", ["--ckpt", "{w}/good.pt", "--format", "pt2", "--output", "{d}/out/m.pt2",
                                            "--example-size", "32"], "m.pt2", read_only="out",
         setup=lambda d, w: _folder(d / "out")),
    Case("export-pt2-size-limit", "export", ["--ckpt", "{w}/good.pt", "--format", "pt2", "--output", "{d}/m.pt2",
                                             "--example-size", "32"], "m.pt2", fsize=3_000),
    Case("export-example-size-huge", "export", ["--ckpt", "{w}/good.pt", "--format", "pt2", "--output", "{d}/m.pt2",
                                                "--example-size", "1000000"], "--example-size"),
    Case("infer-tile-size-huge", "infer", ["--ckpt", "{w}/good.pt", "--input", "{w}/stack.tif", "--output",
                                           "{d}/masks.tif", "--tile-size", "1000000"], "--tile-size"),
    # ---- datasets/isbi2012.py
    Case("download-mirror-missing", "download", ["--data-dir", "{d}/out", "--base-url", "file://{d}/nowhere"],
         "nowhere", standalone=True),
    Case("download-wrong-shape", "download", ["--data-dir", "{d}/out", "--base-url", "file://{d}/mirror"],
         "train-volume.tif", setup=lambda d, w: _mirror(d / "mirror", (3, 64, 64))),
    Case("download-truncated", "download", ["--data-dir", "{d}/out", "--base-url", "file://{d}/mirror"],
         "train-volume.tif", setup=lambda d, w: _mirror(d / "mirror", truncate=True)),
    Case("download-sha256-mismatch", "download", ["--data-dir", "{d}/out", "--base-url", "file://{w}/mirror",
                                                  "--sha256", f"train-volume.tif={SHA_OK}"], "--sha256"),
    Case("download-sha256-malformed", "download", ["--data-dir", "{d}/out", "--sha256", "volume=abc"], "--sha256"),
    Case("download-data-dir-is-file", "download", ["--data-dir", "{d}/f.txt", "--base-url", "file://{w}/mirror"],
         "f.txt", setup=lambda d, w: _file(d / "f.txt")),
    Case("download-read-only", "download", ["--data-dir", "{d}/out", "--base-url", "file://{w}/mirror"],
         "train-volume.tif", read_only="out", setup=lambda d, w: _folder(d / "out")),
    Case("download-size-limit", "download", ["--data-dir", "{d}/out", "--base-url", "file://{w}/mirror"],
         "train-volume.tif", fsize=2_000, setup=lambda d, w: _folder(d / "out")),
]


# ------------------------------------------------------------------------------------------ running

def _snapshot(root: Path) -> dict[str, str]:
    """Every file (SHA-256) and folder under ``root``, hidden temporaries included."""
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        snap[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def _make_unwritable(folder: Path) -> Callable[[], None] | None:
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    return None  # root without chattr +i: no way to make a permission fault here


def _build_world(w: Path):
    _stack(w / "stack.tif", 2, 64)
    _isbi(w / "isbi", 6)
    _ckpt(w / "good.pt")
    _mirror(w / "mirror")
    from unet.cli import train as cli_train
    cli_train.main(cli_train.get_args_parser().parse_args(TINY_TRAIN + ["--model-dir", str(w / "run")]))


def _argv(case: Case, d: Path, w: Path) -> list[str]:
    return [a.replace("{d}", str(d)).replace("{w}", str(w)) for a in case.argv]


def _run_standalone(case: Case, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / SCRIPTS[case.cmd]), *argv], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    return {"rc": proc.returncode, "stderr": proc.stderr}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Set up every case, snapshot, run them all, snapshot again."""
    root = tmp_path_factory.mktemp("bad_inputs")
    world = root / "world"
    _build_world(world)
    dirs, batch, undo, skipped = {}, [], [], set()
    for case in CASES:
        d = dirs[case.id] = root / case.id
        d.mkdir()
        if case.setup:
            case.setup(d, world)
    before = {case.id: _snapshot(dirs[case.id]) for case in CASES}
    world_before = _snapshot(world)
    for case in CASES:
        if case.read_only:
            restore = _make_unwritable(dirs[case.id] / case.read_only)
            if restore is None:
                skipped.add(case.id)
            else:
                undo.append(restore)
    results = {}
    try:
        for case in CASES:
            if case.id in skipped:
                continue
            argv = _argv(case, dirs[case.id], world)
            if case.standalone:
                results[case.id] = _run_standalone(case, argv)
            else:
                batch.append({"id": case.id, "cmd": case.cmd, "argv": argv, "fsize": case.fsize})
        (root / "cases.json").write_text(json.dumps(batch))
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(root / "cases.json"), str(root / "results.json"),
                               str(REPO / SCRIPTS["download"])], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.update(json.loads((root / "results.json").read_text()))
    finally:
        for restore in undo:
            restore()
    after = {case.id: _snapshot(dirs[case.id]) for case in CASES}
    return {"results": results, "before": before, "after": after, "skipped": skipped,
            "world_unchanged": world_before == _snapshot(world)}


def test_the_table_is_large_enough():
    assert len({c.id for c in CASES}) == len(CASES) >= 40
    assert {c.cmd for c in CASES} == set(SCRIPTS)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(table, case):
    if case.id in table["skipped"]:
        pytest.skip("running as root without chattr +i: cannot make a folder unwritable here")
    result = table["results"][case.id]
    lines = result["stderr"].strip().splitlines()
    assert result["rc"] != 0, f"exit 0; stderr: {result['stderr'][-2000:]}"
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert lines and case.names in lines[-1], f"last stderr line: {lines[-1] if lines else '(none)'}"
    before, after = table["before"][case.id], table["after"][case.id]
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)
               and not any(k == m or (m.endswith("/") and (k + "/").startswith(m)) for m in case.may_create)}
    assert not changed, f"files created, changed or removed: {sorted(changed)}"
    assert table["world_unchanged"], "a shared input was modified"


@pytest.mark.slow  # torchrun
def test_torchrun_prints_a_bad_input_error_once(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "train.py"), "--device", "cpu", "--data-dir", str(tmp_path / "nowhere"),
                           "--model-dir", str(tmp_path / "m")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    errors = [line for line in proc.stderr.splitlines() if "error:" in line and "nowhere" in line]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
