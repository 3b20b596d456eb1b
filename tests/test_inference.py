"""infer.py end to end: formats, folder input, streaming memory, atomic outputs, overlays, bad input."""
import subprocess
import sys
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageSequence

from unet.cli import infer as infer_cli
from unet.prediction import jobs as planning
from unet.prediction import stacks as inference

from unet.prediction import pipeline
from unet.checkpoint import save_checkpoint
from unet.cli.commands import infer
from unet.device import setup_device
from unet.prediction.predictor import predict_probabilities
from tiny_models import balanced_unet

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions; shared cores (conftest)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, balanced_unet())
    return path


def _run(argv) -> None:
    assert infer([*map(str, argv), "--device", "cpu", "--no-progress"]) == 0


def _expected_masks(ckpt: Path, stack01: np.ndarray, **kw) -> np.ndarray:
    """Masks predicted slice by slice from the whole stack in memory (the non-streamed reference)."""
    from unet.checkpoint import load_model
    model, _ = load_model(ckpt)
    dev = setup_device("cpu")
    model = dev.prepare_model(model)
    out = []
    for img in stack01:
        probs = predict_probabilities(model, img[None] if img.ndim == 2 else img, dev, **kw)
        out.append(((probs.argmax(0) == 1).to(torch.uint8) * 255).cpu().numpy())
    return np.stack(out)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


# ------------------------------------------------------------------------------------------ acceptance

def test_uint16_nonsquare_stack_streams_to_identical_mask_stack(ckpt, tmp_path):
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 65536, (3, 300, 700), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", stack, photometric="minisblack")  # 3 pages, not one RGB image
    out = tmp_path / "masks.tif"
    _run(["--ckpt", ckpt, "--input", tmp_path / "in.tif", "--output", out, "--read-batch", 2])

    masks = tifffile.imread(out)
    assert masks.shape == (3, 300, 700) and masks.dtype == np.uint8
    assert set(np.unique(masks).tolist()) == {0, 255}
    with Image.open(out) as im:
        frames = np.stack([np.asarray(f) for f in ImageSequence.Iterator(im)])
    np.testing.assert_array_equal(frames, masks)
    with tifffile.TiffFile(out) as tif:
        assert len(tif.series) == 1 and tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    np.testing.assert_array_equal(masks, _expected_masks(ckpt, stack.astype(np.float32) / 65535))
    assert _leftovers(tmp_path) == []


def test_folder_of_two_inputs_gives_two_outputs(ckpt, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    tifffile.imwrite(src / "a.tif", rng.integers(0, 256, (2, 40, 56), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (48, 32), dtype=np.uint8)).save(src / "b.png")
    _run(["--ckpt", ckpt, "--input", src, "--output", tmp_path / "out", "--probabilities", tmp_path / "prob"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.tif", "b.tif"]
    assert tifffile.imread(tmp_path / "out" / "a.tif").shape == (2, 40, 56)
    assert tifffile.imread(tmp_path / "out" / "b.tif").shape == (48, 32)
    assert tifffile.imread(tmp_path / "prob" / "b.tif").dtype == np.float32


@pytest.mark.parametrize("kind", ["imagej", "ome", "float32"])
def test_imagej_ome_and_float_inputs(ckpt, tmp_path, kind):
    rng = np.random.default_rng(2)
    data = rng.random((3, 33, 47), dtype=np.float32)
    path = tmp_path / ("in.ome.tif" if kind == "ome" else "in.tif")
    if kind == "imagej":
        raw = (data * 255).astype(np.uint8)
        tifffile.imwrite(path, raw, imagej=True, metadata={"axes": "ZYX"})
    elif kind == "ome":
        raw = (data * 65535).astype(np.uint16)
        tifffile.imwrite(path, raw, ome=True, metadata={"axes": "ZYX"})
    else:
        raw = data
        tifffile.imwrite(path, raw, photometric="minisblack")
    _run(["--ckpt", ckpt, "--input", path, "--output", tmp_path / "m.tif"])
    masks = tifffile.imread(tmp_path / "m.tif")
    assert masks.shape == (3, 33, 47)
    scale = {"imagej": 255, "ome": 65535, "float32": 1}[kind]
    np.testing.assert_array_equal(masks, _expected_masks(ckpt, raw.astype(np.float32) / np.float32(scale)))


def test_synthetic_default_probabilities_and_overlays(ckpt, tmp_path):
    out, prob, prob8 = tmp_path / "m.tif", tmp_path / "p.tif", tmp_path / "p8.tif"
    _run(["--ckpt", ckpt, "--output", out, "--probabilities", prob, "--overlay", tmp_path / "ov"])
    _run(["--ckpt", ckpt, "--output", tmp_path / "m2.tif", "--probabilities", prob8, "--prob-dtype", "uint8"])
    n, h, w = planning.SYNTHETIC_SHAPE
    masks, p = tifffile.imread(out), tifffile.imread(prob)
    assert masks.shape == p.shape == (n, h, w) and p.dtype == np.float32
    clear = np.abs(p - 0.5) > 1e-6  # at a tie argmax may go either way
    np.testing.assert_array_equal((masks == 255)[clear], (p > 0.5)[clear])
    np.testing.assert_array_equal(tifffile.imread(prob8), np.rint(p * 255).astype(np.uint8))
    pngs = sorted((tmp_path / "ov").iterdir())
    assert [f.name for f in pngs] == [f"synthetic_{k:03d}.png" for k in range(n)]
    with Image.open(pngs[0]) as im:
        assert im.mode == "RGB" and im.size == (w, h)
        rgb = np.asarray(im)
    membrane = masks[0] == 0
    assert membrane.any() and (~membrane).any()
    assert (rgb[membrane][:, 0] > rgb[membrane][:, 2]).all()  # membranes are tinted red
    assert (rgb[~membrane][:, 0] == rgb[~membrane][:, 2]).all()  # cells stay grey


# ------------------------------------------------------------------------------------------ streaming

@pytest.mark.slow  # a 40-slice stack, twice
def test_streaming_memory_is_bounded_and_matches_whole_stack(ckpt, tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    stack = rng.integers(0, 256, (400, 64, 64), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "deep.tif", stack)
    from unet.checkpoint import load_model
    model, _ = load_model(ckpt)
    dev = setup_device("cpu")
    model = dev.prepare_model(model)

    # Masks are torch tensors, which tracemalloc cannot see: weak references to every chunk read, every
    # scaled slice and every mask show how much the reader, device loop and writer still hold.
    chunks, images, masks_made, alive = [], [], [], []
    real_pages, real_image, real_mask = inference.iter_job_pages, pipeline.as_image, pipeline.mask_from_probabilities

    def count(refs):
        return sum(ref() is not None for ref in refs)

    def pages(info, batch):
        for chunk in real_pages(info, batch):
            alive.append((count(chunks), count(images), count(masks_made)))
            chunks.append(weakref.ref(chunk))
            yield chunk

    def image(*args):
        out = real_image(*args)
        images.append(weakref.ref(out))
        return out

    def mask(probs):
        out = real_mask(probs)
        masks_made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(inference, "iter_job_pages", pages)
    monkeypatch.setattr(pipeline, "as_image", image)
    monkeypatch.setattr(pipeline, "mask_from_probabilities", mask)
    jobs = planning.plan_jobs(tmp_path / "deep.tif", tmp_path / "m.tif", probabilities=tmp_path / "p.tif")
    inference.run_inference(model, dev, jobs, inference.InferOptions(read_batch=8, no_progress=True))  # also the warm-up below
    assert len(chunks) == 400 // 8 and len(images) == len(masks_made) == 400
    # Bounded by the queues, not the depth: the chunk being read and the previous one, READ_AHEAD queued
    # slices + one the reader holds + the slices of one tile batch (tile_batch 4), WRITE_AHEAD masks + 2.
    assert max(a[0] for a in alive) <= 2
    assert max(a[1] for a in alive) <= pipeline.READ_AHEAD + 1 + 4 + 1
    assert max(a[2] for a in alive) <= pipeline.WRITE_AHEAD + 2
    assert all(ref() is None for refs in [chunks, images, masks_made] for ref in refs)
    monkeypatch.undo()

    # What numpy allocates (the raw pages, scaled images, uint8 conversions) tracemalloc does see.
    jobs = planning.plan_jobs(tmp_path / "deep.tif", tmp_path / "w.tif", probabilities=tmp_path / "wp.tif")
    tracemalloc.start()
    try:
        inference.run_inference(model, dev, jobs, inference.InferOptions(read_batch=8, no_progress=True))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full_float32 = stack.size * 4  # 6.5 MB: what holding the stack (or its probabilities) would cost
    assert peak < full_float32 / 4, f"peak traced memory {peak / 2**20:.2f} MiB grows with the stack"
    masks = tifffile.imread(tmp_path / "m.tif")
    assert masks.shape == stack.shape
    np.testing.assert_array_equal(masks, _expected_masks(ckpt, stack.astype(np.float32) / 255))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "w.tif"), masks)


@pytest.mark.parametrize("stage, target", [("device", "unet.prediction.pipeline.predict_tiles"),
                                           ("reader", "unet.prediction.pipeline.as_image"),
                                           ("writer", "unet.prediction.stacks.write_png_atomic")])
def test_interrupted_run_leaves_no_output(ckpt, tmp_path, monkeypatch, stage, target):
    """A failure in any of the three stages reaches the caller unchanged and removes every partial output."""
    tifffile.imwrite(tmp_path / "in.tif", np.zeros((6, 32, 32), np.uint8))
    calls = {"n": 0}
    module, name = target.rsplit(".", 1)
    real = getattr(__import__(module, fromlist=[name]), name)

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError(f"{stage} lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, failing)
    with pytest.raises(RuntimeError, match=f"{stage} lost"):
        _run(["--ckpt", ckpt, "--input", tmp_path / "in.tif", "--output", tmp_path / "m.tif",
              "--probabilities", tmp_path / "p.tif", "--instances", tmp_path / "i.tif", "--overlay", tmp_path / "ov",
              "--read-batch", 2, "--tile-batch", 1])
    assert calls["n"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "ov"]
    assert list((tmp_path / "ov").iterdir()) == []


def test_user_error_in_the_reader_thread_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    tifffile.imwrite(tmp_path / "in.tif", np.zeros((6, 32, 32), np.uint8))
    real = pipeline.as_image

    def bad_page(raw, source, channels):  # as a page with an unsupported pixel type would fail
        return real(raw.astype(np.int32), source, channels)

    monkeypatch.setattr(pipeline, "as_image", bad_page)
    _bad(["--ckpt", ckpt, "--input", tmp_path / "in.tif", "--output", tmp_path / "m.tif"], capsys,
         "in.tif: pixel type int32 is not supported")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


# ------------------------------------------------------------------------------------------ bad input

def _bad(argv, capsys, *must_contain) -> str:
    with pytest.raises(SystemExit) as e:
        infer([*map(str, argv), "--device", "cpu", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    err = "\n".join(line for line in err.splitlines() if not line.startswith("predicting "))  # status line
    assert len(err.splitlines()) == 1, err
    for s in must_contain:
        assert s in err, err
    return err


def test_bad_inputs_are_one_line_errors(ckpt, tmp_path, capsys):
    out = tmp_path / "m.tif"
    _bad(["--ckpt", ckpt, "--input", tmp_path / "nope.tif", "--output", out], capsys, "nope.tif", "not found")

    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage" * 10)
    _bad(["--ckpt", ckpt, "--input", tmp_path / "junk.tif", "--output", out], capsys, "junk.tif")

    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tif:
        for shape in ((32, 32), (32, 32), (40, 32)):
            tif.write(np.zeros(shape, np.uint8), metadata=None)
    _bad(["--ckpt", ckpt, "--input", tmp_path / "mixed.tif", "--output", out], capsys,
         "mixed.tif", "page 2 is 32x40", "same size")

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "rgb.png")
    _bad(["--ckpt", ckpt, "--input", tmp_path / "rgb.png", "--output", out], capsys, "rgb.png", "3 channels")

    tifffile.imwrite(tmp_path / "ok.tif", np.zeros((2, 32, 32), np.uint8))
    _bad(["--ckpt", ckpt, "--input", tmp_path / "ok.tif", "--output", tmp_path / "no" / "m.tif"], capsys,
         "does not exist")

    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    _bad(["--ckpt", tmp_path / "other.pt", "--input", tmp_path / "ok.tif", "--output", out], capsys,
         "other.pt", "not a unet-em checkpoint")
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("change", [-1, 1])
def test_input_changed_during_the_run_leaves_no_output(ckpt, tmp_path, capsys, monkeypatch, change):
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.zeros((4, 32, 32), np.uint8), photometric="minisblack")
    real_plan = planning.plan_jobs

    def plan_then_rewrite(*args, **kwargs):
        jobs = real_plan(*args, **kwargs)
        # Rewritten after its header was read, as another program might do during a long run.
        tifffile.imwrite(src, np.zeros((4 + change, 32, 32), np.uint8), photometric="minisblack")
        return jobs

    monkeypatch.setattr(infer_cli, "plan_jobs", plan_then_rewrite)
    with pytest.raises(SystemExit) as e:
        _run(["--ckpt", ckpt, "--input", src, "--output", tmp_path / "m.tif", "--overlay", tmp_path / "ov"])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the "predicting ..." status line
    assert last.startswith("infer.py: error: "), last
    assert "in.tif: the number of slices changed during the run (its header said 4)" in last, last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "ov"]
    assert list((tmp_path / "ov").iterdir()) == []


@pytest.mark.parametrize("flag, value, message", [
    ("--tile-batch", "0", "must be at least 1, got 0"),
    ("--read-batch", "-2", "must be at least 1, got -2"),
    ("--read-batch", "2.5", "must be a whole number, got '2.5'"),
    ("--overlap", "1.5", "must be in [0, 1), got 1.5"),
    ("--overlap", "-0.1", "must be in [0, 1), got -0.1"),
    ("--overlap", "nan", "must be in [0, 1), got nan"),
])
def test_bad_numbers_fail_when_parsed(ckpt, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        infer(["--ckpt", str(ckpt), "--output", str(tmp_path / "m.tif"), flag, value, "--device", "cpu"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"infer.py: error: argument {flag}: {message}"
    assert list(tmp_path.iterdir()) == []


def test_export_is_refused_before_loading(tmp_path, capsys):
    # Programs are written by export.py now; infer.py --export only says so, before loading, writing nothing.
    _bad(["--ckpt", tmp_path / "missing.pt", "--export", tmp_path / "m.pt2", "--output", tmp_path / "m.tif"],
         capsys, "--export", "export.py --format pt2|onnx", "m.pt2")
    _bad(["--ckpt", tmp_path / "missing.pt", "--export", tmp_path / "m.pt2"], capsys, "export.py --format pt2|onnx")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(ckpt, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "in.tif", np.zeros((2, 32, 32), np.uint8))
    out = tmp_path / "m.tif"
    out.write_bytes(b"keep me")
    _bad(["--ckpt", ckpt, "--input", tmp_path / "in.tif", "--output", out], capsys, "m.tif", "--overwrite")
    assert out.read_bytes() == b"keep me"
    _run(["--ckpt", ckpt, "--input", tmp_path / "in.tif", "--output", out, "--overwrite"])
    assert tifffile.imread(out).shape == (2, 32, 32)


@pytest.mark.slow  # subprocesses
def test_real_subprocess_exit_code_and_one_line(ckpt, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "infer.py"), "--ckpt", str(ckpt), "--input",
                           str(tmp_path / "missing.tif"), "--output", str(tmp_path / "m.tif"), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.tif" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.tif").exists()
