"""infer.py --instances: label stacks from the seeded watershed, ids unique over the stack, uint16/uint32."""
import numpy as np
import pytest
import tifffile

from unet.io.writers import LabelStackWriter
from unet.checkpoint import save_checkpoint
from unet.cli.commands import infer
from unet.prediction.instances import InstanceOptions, instance_stack
from tiny_models import balanced_unet


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = balanced_unet()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model)
    return path


def _run(*argv) -> None:
    assert infer([*map(str, argv), "--device", "cpu", "--no-progress"]) == 0


@pytest.mark.parametrize("flags, options", [
    ([], InstanceOptions()),
    (["--instance-seeds", "distance", "--instance-h", "1.5", "--instance-smooth", "0", "--no-instance-fill",
      "--instance-threshold", "0.4"], InstanceOptions(threshold=0.4, seeds="distance", seed_h=1.5, smooth=0, fill=False)),
])
def test_instances_are_the_watershed_of_the_written_probabilities(ckpt, tmp_path, flags, options):
    stack = np.random.default_rng(0).integers(0, 256, (3, 48, 60), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "in.tif", stack, photometric="minisblack")
    _run("--ckpt", ckpt, "--input", tmp_path / "in.tif", "--output", tmp_path / "m.tif",
         "--probabilities", tmp_path / "p.tif", "--instances", tmp_path / "i.tif", *flags)
    labels, probs = tifffile.imread(tmp_path / "i.tif"), tifffile.imread(tmp_path / "p.tif")
    expected = instance_stack(probs, options)  # the whole stack at once: ids run on from slice to slice
    assert labels.dtype == np.uint16 and expected.dtype == np.uint16
    np.testing.assert_array_equal(labels, expected)
    ids = [set(np.unique(s).tolist()) - {0} for s in labels]
    assert all(ids) and not (ids[0] & ids[1]) and not (ids[1] & ids[2])  # unique over the stack
    assert sorted(set().union(*ids)) == list(range(1, labels.max() + 1))


def test_folder_input_gives_one_label_stack_per_input(ckpt, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        tifffile.imwrite(src / f"{name}.tif", np.random.default_rng(1).integers(0, 256, (2, 40, 40), np.uint8))
    _run("--ckpt", ckpt, "--input", src, "--output", tmp_path / "m", "--instances", tmp_path / "inst")
    assert sorted(p.name for p in (tmp_path / "inst").iterdir()) == ["a.tif", "b.tif"]
    assert tifffile.imread(tmp_path / "inst" / "a.tif").shape == (2, 40, 40)


@pytest.mark.parametrize("per_slice, dtype", [(30000, np.uint16), (40000, np.uint32)])
def test_label_writer_narrows_only_when_every_id_fits(tmp_path, per_slice, dtype):
    """Two slices of ``per_slice`` one-pixel cells: ids up to 60000 (uint16) or 80000 (uint32)."""
    slices = [np.arange(1, per_slice + 1, dtype=np.int64).reshape(-1, 100) for _ in range(2)]
    slices[1][0, 0] = 0  # a membrane pixel stays 0
    path = tmp_path / "labels.tif"
    with LabelStackWriter(path, pixels=2 * per_slice) as writer:
        for lab in slices:
            writer.append(lab)
    got = tifffile.imread(path)
    assert got.dtype == dtype and int(got.max()) == 2 * per_slice
    np.testing.assert_array_equal(got[0], slices[0])
    np.testing.assert_array_equal(got[1], np.where(slices[1] > 0, slices[1] + per_slice, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]  # no hidden uint32 file left


def test_bad_instance_flag_is_one_line(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        infer(["--ckpt", str(ckpt), "--output", str(tmp_path / "m.tif"), "--instances", str(tmp_path / "i.tif"),
               "--instance-threshold", "1.5", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "infer.py: error: argument --instance-threshold: must be in [0, 1), got 1.5"
    assert list(tmp_path.iterdir()) == []
