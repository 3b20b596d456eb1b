"""Block-wise --instances (issue 20 item 6): one id per cell across block faces, ids unique and consecutive over the
volume, --resume after a crash in any pass, several ranks (threads here, torchrun in the slow test) as one."""
import contextlib
import threading
from pathlib import Path

import numpy as np
import pytest

from unet.checkpoint import save_checkpoint
from unet.cli.commands import infer
from unet.data.synthetic import make_synthetic_em
from unet.distributed import DistInfo
from unet.errors import UserError
from unet.io.volume_writers import create_volume
from unet.io.volumes import open_volume
from unet.prediction import block_instances, volume_jobs
from unet.prediction.block_instances import (BlockInstanceSettings, InstancePasses, StitchOptions, _Classes, match_ids,
                                             stitch_iou)
from unet.prediction.block_records import BlockRecords
from unet.prediction.blocks import block_grid
from unet.prediction.instances import InstanceOptions, instance_stack
from unet.prediction.tiling import TilingOptions
from infer_runs import write_em_volume
from tiny_models import balanced_unet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions; shared cores (conftest)

SHAPE = (3, 40, 56)
BLOCKS = ["--chunks", "16", "--block-size", "16"]  # 3 x 4 blocks per slice, 36 in all
NUM_BLOCKS = 36


# ------------------------------------------------------------------------------------------------ helpers

def _read(spec) -> np.ndarray:
    """A whole output volume: labels (uint32) or probabilities (float32)."""
    try:
        with open_volume(str(spec), labels=True) as vol:
            return vol.read()
    except UserError:
        with open_volume(str(spec)) as vol:
            return vol.read()


def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The distinct (id of a, id of b) pairs of the same pixels: the contingency table's non-empty cells."""
    return np.unique(np.stack([a.ravel().astype(np.int64), b.ravel().astype(np.int64)]), axis=1)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """a and b are equal up to a relabelling: a bijection between their ids that maps 0 (membrane) to 0."""
    pa, pb = _pairs(a, b)
    return (len(np.unique(pa)) == len(np.unique(pb)) == len(pa)) and bool(np.all((pa == 0) == (pb == 0)))


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Pixels on which a and b agree under the best matching of their ids, as a fraction: for each id its largest
    overlap with an id of the other, summed, in the worse of the two directions (a split or a merge both count)."""
    def one(x, y):
        pairs, counts = np.unique(x.ravel().astype(np.int64) * (int(y.max()) + 1) + y.ravel(), return_counts=True)
        ids = pairs // (int(y.max()) + 1)
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        return np.maximum.reduceat(counts, starts).sum() / x.size
    return min(one(a, b), one(b, a))


def _unique_and_consecutive(labels: np.ndarray) -> None:
    ids = np.unique(labels)
    assert labels.dtype == np.uint32
    assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(ids)))  # 1..n, no gap
    per_slice = [set(np.unique(s).tolist()) - {0} for s in labels]
    assert sum(map(len, per_slice)) == len(ids) - 1  # no id in two slices


def _stitched(tmp_path: Path, probs: np.ndarray, block: int = 64, settings=BlockInstanceSettings()):
    """The instance passes alone on a given cell-probability volume (no model): labels and the passes' stats."""
    grid = block_grid(probs.shape, (block, block), balanced_unet("same"), TilingOptions(tile_size=16))
    records = BlockRecords(tmp_path / "m.zarr")
    records.start({})
    with contextlib.ExitStack() as opened:
        source = opened.enter_context(create_volume(str(tmp_path / "p.zarr"), probs.shape, np.float32,
                                                    (1, block, block)))
        source.write((0, 0, 0), probs.astype(np.float32))
        passes = InstancePasses(tmp_path / "i.zarr", grid, (block, block), records, settings)
        passes.open(source, False, opened, None)
        stats = passes.run()
        passes.output.commit()
    records.remove()
    return _read(tmp_path / "i.zarr"), stats


def _discs(shape: tuple[int, int, int], radius: int = 9, spacing: int = 32) -> np.ndarray:
    """Cell probability 1 on discs, 0 between: a lattice of discs every ``spacing`` px, centred on the 64-px block
    faces and corners in slice 0, between them in slice 1, jittered in slice 2 (gaps of >= 10 px everywhere)."""
    probs = np.zeros(shape, np.float32)
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    rng = np.random.default_rng(3)
    for z, offset in enumerate((0, 16, 8)):
        for cy in range(offset, shape[1], spacing):
            for cx in range(offset, shape[2], spacing):
                jy, jx = rng.integers(-2, 3, 2) if z == 2 else (0, 0)
                probs[z][(yy - cy - jy) ** 2 + (xx - cx - jx) ** 2 <= radius ** 2] = 1
    return probs


# ------------------------------------------------------------------------------------------------ the stitching

def test_discs_across_block_corners_get_one_id_each(tmp_path):
    """(a), exact: without fill every pixel is a disc's or membrane, and the block-wise labels equal the whole-slice
    watershed's up to a relabelling; discs on block faces and corners (up to 4 blocks each) are one cell."""
    probs = _discs((3, 256, 256))
    options = InstanceOptions(fill=False)
    labels, stats = _stitched(tmp_path, probs, settings=BlockInstanceSettings(options))
    whole = instance_stack(probs, options)
    assert _same_partition(labels, whole)
    assert stats.labelled == stats.relabelled == 3 * 16 and stats.merged == 3
    assert stats.cells == len(np.unique(whole)) - 1 and stats.joins > 0
    _unique_and_consecutive(labels)
    corner = labels[0, 60:69, 60:69]  # the disc centred on the corner of blocks 0, 1, 4, 5
    assert len(np.unique(corner[corner > 0])) == 1


def test_discs_with_fill_agree_on_cells_and_almost_everywhere(tmp_path):
    """(a), with fill (the default): the disc pixels are exact; the membrane between discs is flooded from the
    seeds a block's view holds, and the watershed breaks ties in its own order, so the one-pixel lines between
    cells may shift at block seams: >= 99 % of pixels agree under the best matching (measured 99.9 %)."""
    probs = _discs((3, 256, 256))
    labels, _ = _stitched(tmp_path, probs)
    whole = instance_stack(probs)
    discs = probs > 0.5
    assert _same_partition(labels[discs], whole[discs])
    assert _agreement(labels, whole) >= 0.99
    _unique_and_consecutive(labels)


def test_synthetic_cells_agree_with_the_whole_slice(tmp_path):
    """(a), a bound on realistic cells (the synthetic EM set's label maps, smoothed, as the cell probability):
    block-wise instances agree with the whole-slice watershed on >= 99 % of pixels (best matching; measured 99.85 %,
    99.2 % with an 8-px halo)."""
    _, labels = make_synthetic_em(2, 256, 256, seed=1)
    from scipy import ndimage
    probs = np.stack([ndimage.gaussian_filter((lab > 0).astype(np.float32), 1.5) for lab in labels])
    got, _ = _stitched(tmp_path, probs)
    assert _agreement(got, instance_stack(probs)) >= 0.99
    _unique_and_consecutive(got)


def test_isbi_cells_agree_with_the_whole_slice(tmp_path, isbi_dir):
    """(a) on real cell shapes: ISBI 2012 training labels (smoothed) as the cell probability, 512 x 512 slices in
    128-px blocks with the default 64-px halo: the same number of cells as the whole-slice watershed and >= 99.9 %
    of pixels agreeing under the best matching (measured 99.95 % on the first 4 slices; 99.72 % with a 16-px halo)."""
    import tifffile
    from scipy import ndimage
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[:2]
    probs = np.stack([ndimage.gaussian_filter((lab > 0).astype(np.float32), 1.5) for lab in labels])
    got, stats = _stitched(tmp_path, probs, 128)
    whole = instance_stack(probs)
    assert stats.cells == len(np.unique(whole)) - 1
    assert _agreement(got, whole) >= 0.999
    _unique_and_consecutive(got)


def test_match_ids_threshold_is_strict_and_one_to_one():
    a = np.array([1] * 10 + [2] * 10 + [3] * 4)
    b = np.array([5] * 8 + [0] * 2 + [6] * 10 + [7] * 2 + [8] * 2)
    pa, pb, score = match_ids(a, b, 0.5)
    assert list(zip(pa, pb)) == [(1, 5), (2, 6)]  # IoU 0.8 and 1; 3 meets 7 and 8 at IoU 0.5 each: neither
    np.testing.assert_allclose(score, [0.8, 1.0])
    assert list(match_ids(a, b, 0.8)[0]) == [2]  # strictly above the threshold
    assert len(match_ids(np.zeros(5, int), b[:5], 0.5)[0]) == 0


def test_classes_never_join_two_ids_of_one_block():
    classes = _Classes(np.array([0, 0, 1]))  # ids 0 and 1 in block 0, id 2 in block 1
    assert classes.join(0, 2) and not classes.join(1, 2) and not classes.join(2, 0)
    assert list(np.unique(classes.roots(), return_inverse=True)[1]) == [0, 1, 0]


def test_stitch_options_are_checked():
    assert stitch_iou("0.5") == 0.5
    for bad in ("0.4", "1", "nan", "x"):
        with pytest.raises(ValueError):
            stitch_iou(bad)
    with pytest.raises(ValueError):
        StitchOptions(halo=0)


# ------------------------------------------------------------------------------------------------ infer.py

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A synthetic stack as OME-Zarr and a 'same' checkpoint."""
    root = tmp_path_factory.mktemp("block_instances")
    write_em_volume(root / "em.ome.zarr", SHAPE)
    save_checkpoint(root / "same.pt", balanced_unet("same"))
    return {"root": root, "ckpt": root / "same.pt"}


def _infer(data, tmp_path, *argv) -> None:
    assert infer(["--ckpt", str(data["ckpt"]), "--input", str(data["root"] / "em.ome.zarr"), "--output",
                  str(tmp_path / "m.zarr"), "--tile-size", "16", "--tile-batch", "1", *BLOCKS, *map(str, argv),
                  "--device", "cpu", "--precision", "fp32", "--no-progress"]) == 0


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict:
    """An uninterrupted block-wise run with float32 probabilities: its instances and probabilities."""
    out = tmp_path_factory.mktemp("reference")
    _infer(data, out, "--probabilities", out / "p.zarr", "--instances", out / "i.zarr")
    return {"instances": _read(out / "i.zarr"), "probabilities": _read(out / "p.zarr")}


def test_infer_blockwise_instances_equal_the_whole_slice_watershed(reference, tmp_path):
    """With the default halo every block's view is the whole (40 x 56) slice, so the block-wise instances are the
    whole-slice watershed's of the same probabilities exactly, up to a relabelling."""
    labels = reference["instances"]
    assert _same_partition(labels, instance_stack(reference["probabilities"]))
    _unique_and_consecutive(labels)


def test_infer_small_halo_and_hdf5_without_probabilities(data, reference, tmp_path):
    """No --probabilities: the cell probabilities go to a temporary store (gone at the end); an HDF5 output; an 8-px
    halo, so the views are smaller than the slice. The result is the instance passes' on the same probabilities
    (those of the reference run, bit-identical at tile batch 1). (This random-weight model's probabilities are
    noise around 0.5 with few seeds: a view of 32 x 32 px often holds none, so unlike the whole slice it floods
    nothing there. Agreement with the whole-slice watershed is measured on cells in the tests above.)"""
    _infer(data, tmp_path, "--instances", tmp_path / "i.h5/cells", "--instance-halo", "8")
    labels = _read(tmp_path / "i.h5/cells")
    _unique_and_consecutive(labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.h5", "m.zarr"]  # no records, no temporary store
    alone = tmp_path / "alone"
    alone.mkdir()
    expected, _ = _stitched(alone, reference["probabilities"], 16, BlockInstanceSettings(stitch=StitchOptions(halo=8)))
    np.testing.assert_array_equal(labels, expected)


def _marks(monkeypatch, crash_stage: str | None = None, after: int = 0) -> dict[str, list]:
    """Log every record made, per stage; with ``crash_stage``, raise instead of making its record number
    ``after + 1``: the block (or slice) is written but not recorded, as when a run dies inside a finisher."""
    log: dict[str, list] = {}
    real = BlockRecords.mark

    def mark(self, index, stage="done", data=None):
        if stage == crash_stage and len(log.get(stage, [])) == after:
            raise RuntimeError("node lost")
        log.setdefault(stage, []).append(index)
        return real(self, index, stage, data)

    monkeypatch.setattr(BlockRecords, "mark", mark)
    return log


STAGES = ("done", "labels", "merged", "relabelled")  # the records of pass 1, 2, 3a (slices) and 3b


@pytest.mark.parametrize("crash, after, probabilities", [
    ("done", 7, None), ("labels", 9, "p.zarr"), ("merged", 1, None), ("relabelled", 5, "p.h5/prob")])
def test_resume_after_a_crash_in_any_pass(data, reference, tmp_path, monkeypatch, crash, after, probabilities):
    """(c): a crash in the prediction, label, merge or relabel pass (a block or slice written, its record not
    made), then --resume: each pass does only the blocks (slices) it has no record of, and the instances are the
    uninterrupted run's, ids and all."""
    args = ["--instances", tmp_path / "i.zarr"] + (["--probabilities", tmp_path / probabilities] if probabilities else [])
    with monkeypatch.context() as m:
        _marks(m, crash, after)
        with pytest.raises(RuntimeError, match="node lost"):
            _infer(data, tmp_path, *args)
    records = BlockRecords(tmp_path / "m.zarr")
    done = {stage: records.done(stage) for stage in STAGES}
    assert len(done[crash]) == after and all(len(done[s]) == 0 for s in STAGES[STAGES.index(crash) + 1:])
    with monkeypatch.context() as m:
        again = _marks(m)
        _infer(data, tmp_path, *args, "--resume")
    totals = {"done": NUM_BLOCKS, "labels": NUM_BLOCKS, "merged": SHAPE[0], "relabelled": NUM_BLOCKS}
    assert {s: sorted(again.get(s, [])) for s in STAGES} == \
        {s: sorted(set(range(totals[s])) - done[s]) for s in STAGES}  # only what has no record
    np.testing.assert_array_equal(_read(tmp_path / "i.zarr"), reference["instances"])
    assert not records.folder.exists()


def test_resume_with_other_instance_settings_is_refused(data, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        _marks(m, "labels", 3)
        with pytest.raises(RuntimeError):
            _infer(data, tmp_path, "--instances", tmp_path / "i.zarr")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _infer(data, tmp_path, "--instances", tmp_path / "i.zarr", "--instance-halo", "32", "--resume")
    assert e.value.code == 2
    assert "other instance settings (stitch_halo 64, now 32)" in capsys.readouterr().err


def test_bad_stitch_flag_is_a_usage_error(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _infer(data, tmp_path, "--instances", tmp_path / "i.zarr", "--instance-stitch-iou", "0.3")
    assert e.value.code == 2
    assert "argument --instance-stitch-iou: must be in [0.5, 1), got 0.3" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ several ranks

def test_two_ranks_in_threads_equal_one_process(data, reference, tmp_path, monkeypatch):
    """(d) in one process: two ranks as threads meeting at a shared barrier in every pass; each labels and
    relabels its own blocks (r, r + 2, ...), rank 0 merges; the instances are the one-process run's."""
    from unet.device import setup_device
    from unet.io.volumes import VolumeOptions
    from unet.prediction.jobs import plan_jobs
    from unet.prediction.pipeline import StackPredictor

    dev = setup_device("cpu")
    model = dev.prepare_model(balanced_unet("same"))
    job = plan_jobs(data["root"] / "em.ome.zarr", tmp_path / "m.zarr", probabilities=tmp_path / "p.zarr",
                    instances=tmp_path / "i.zarr", volume=VolumeOptions(), processes=2)[0]
    settings = volume_jobs.BlockJobSettings((16, 16), (16, 16), identity={"checkpoints": ["x"]})
    meeting = threading.Barrier(2, timeout=120)
    monkeypatch.setattr(volume_jobs, "barrier", meeting.wait)
    monkeypatch.setattr(block_instances, "barrier", meeting.wait)
    labelled: dict[int, list] = {0: [], 1: []}
    real_label = InstancePasses._label_blocks

    def label(self):
        labelled[self.dist.rank] = [b.index for b in self._mine("labels")]
        real_label(self)

    monkeypatch.setattr(InstancePasses, "_label_blocks", label)
    errors = []

    def rank(r):
        try:
            predictor = StackPredictor(model, dev, TilingOptions(tile_size=16, tile_batch=1))
            volume_jobs.run_block_job(job, predictor, settings, dist=DistInfo(rank=r, world_size=2))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            meeting.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert labelled == {r: list(range(r, NUM_BLOCKS, 2)) for r in (0, 1)}
    np.testing.assert_array_equal(_read(tmp_path / "i.zarr"), reference["instances"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.zarr", "m.zarr", "p.zarr"]


@pytest.mark.slow  # two torchrun processes
def test_torchrun_two_processes_equal_one(data, reference, tmp_path):
    import os
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(repo / "infer.py"), "--ckpt", str(data["ckpt"]), "--input",
                          str(data["root"] / "em.ome.zarr"), "--device", "cpu", "--precision", "fp32", "--no-progress",
                          "--tile-size", "16", "--tile-batch", "1", *BLOCKS, "--output", str(tmp_path / "m.zarr"),
                          "--instances", str(tmp_path / "i.zarr")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count(f"blocks: {NUM_BLOCKS} of {NUM_BLOCKS} predicted") == 1
    np.testing.assert_array_equal(_read(tmp_path / "i.zarr"), reference["instances"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.zarr", "m.zarr"]


# ------------------------------------------------------------------------------------------------ memory

def test_traced_memory_of_instances_depends_on_the_block_not_the_slice(tmp_path):
    """Item 7 with --instances: the traced (numpy and Python) peak of a block-wise run with instances grows by less
    than a quarter of one float32 slice when the slices get 4x wider: every pass holds a block and its halo, the
    merge one slice's ids. (With one block per slice, i.e. the whole slice in one watershed, the same check fails:
    2.8 MB -> 10.8 MB, the watershed's ~140 bytes per pixel.)"""
    import tracemalloc
    ckpt = tmp_path / "s.pt"
    save_checkpoint(ckpt, balanced_unet("same"))
    peaks = []
    for width in (256, 1024):
        images = np.random.default_rng(0).integers(0, 256, (1, 64, width), dtype=np.uint8)
        w = create_volume(str(tmp_path / f"in{width}.zarr"), images.shape, np.uint8, (1, 32, 32))
        w.write((0, 0, 0), images)
        w.commit()
        tracemalloc.start()
        assert infer(["--ckpt", str(ckpt), "--input", str(tmp_path / f"in{width}.zarr"), "--output",
                      str(tmp_path / f"m{width}.zarr"), "--instances", str(tmp_path / f"i{width}.zarr"),
                      "--instance-halo", "16", "--tile-size", "32", "--chunks", "32", "--block-size", "32",
                      "--device", "cpu", "--precision", "fp32", "--no-progress"]) == 0
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] - peaks[0] < 64 * 1024 * 4 / 4, peaks
