"""The stack pipeline (unet.prediction.pipeline) against today's per-slice path: same masks, same probabilities."""
import numpy as np
import pytest
import tifffile
import torch

from unet.checkpoint import save_checkpoint
from unet.cli.commands import infer
from unet.device import DeviceSetup, setup_device
from unet.errors import UserError
from unet.io.images import as_image
from unet.prediction.pipeline import StackPredictor
from unet.prediction.predictor import (FREE_MEMORY_SHARE, free_memory_budget_mb, mask_from_probabilities,
                                      predict_probabilities)
from unet.prediction.tiling import TilingOptions


from tiny_models import balanced_unet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions; shared cores (conftest)


def predict_pages(model, dev, chunks, *, source="input", options=None):
    """The per-slice path: one predict_probabilities per slice (tiles batched only within a slice), holding one
    chunk of raw pages at a time; yields ``(image, mask, probability)`` per slice: the [0, 1] ``(C, H, W)``
    float32 input, the uint8 ``(H, W)`` mask (255 = cell) and the float32 ``(H, W)`` class-1 probability."""
    for chunk in chunks:
        for raw in chunk:
            image = as_image(raw, source, None)  # predict_probabilities checks the channels
            probs = predict_probabilities(model, image, dev, options)
            mask = mask_from_probabilities(probs).cpu().numpy()
            yield image, mask, probs[1].float().cpu().numpy()


def _per_slice(model, dev, stack, options):
    """The per-slice path (:func:`predict_pages`), against which the stack pipeline is checked."""
    masks, probs = [], []
    for _, mask, prob in predict_pages(model, dev, [stack], options=options):
        masks.append(mask)
        probs.append(prob)
    return np.stack(masks), np.stack(probs)


def _pipeline(model, dev, stack, options, read_batch=2):
    got = {}

    def sink(k, image, mask, prob):
        got[k] = (mask.copy(), prob.copy())

    count = StackPredictor(model, dev, options).run((stack[i:i + read_batch] for i in range(0, len(stack), read_batch)),
                                                    sink, keep_probabilities=True)
    assert count == len(stack) and sorted(got) == list(range(len(stack)))
    return np.stack([got[k][0] for k in range(count)]), np.stack([got[k][1] for k in range(count)])


@pytest.mark.parametrize("padding, shape, tile_size, tile_batch", [("same", (5, 70, 101), 32, 5),
                                                                   ("valid", (7, 45, 83), 28, 4),
                                                                   ("same", (3, 40, 40), None, 5)])
@pytest.mark.parametrize("tta", [False, True])
def test_cross_slice_batches_give_the_per_slice_masks(padding, shape, tile_size, tile_batch, tta):
    """Odd depths, uneven sizes (several tiles a slice, the last ones cut off), batches that straddle slices."""
    model = balanced_unet(padding, probe=68)
    dev = setup_device("cpu")
    model = dev.prepare_model(model)
    stack = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    options = TilingOptions(tile_size=tile_size, tile_batch=tile_batch, tta=tta)
    plan, batch = StackPredictor(model, dev, options).plan(*shape[1:])
    assert batch == tile_batch and plan.num_tiles % batch != 0  # so that batches straddle slices
    ref_masks, ref_probs = _per_slice(model, dev, stack, options)
    masks, probs = _pipeline(model, dev, stack, options)
    assert set(np.unique(ref_masks).tolist()) == {0, 255}
    np.testing.assert_array_equal(masks, ref_masks)
    # Each tile's computation is the same but the batch around it is not; oneDNN gives the same bits here,
    # a different convolution algorithm for another batch size could round differently, hence the tolerance.
    np.testing.assert_allclose(probs, ref_probs, rtol=0, atol=1e-6)


def test_folder_of_stacks_of_different_sizes_matches_per_slice(tmp_path):
    model = balanced_unet("same", probe=68)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model)
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    stacks = {"a": rng.integers(0, 256, (3, 50, 77), dtype=np.uint8), "b": rng.integers(0, 256, (5, 33, 40),
                                                                                           dtype=np.uint8)}
    for name, stack in stacks.items():
        tifffile.imwrite(src / f"{name}.tif", stack, photometric="minisblack")
    assert infer(["--ckpt", str(path), "--input", str(src), "--output", str(tmp_path / "out"), "--tta",
                  "--tile-size", "32", "--tile-batch", "3", "--device", "cpu", "--no-progress"]) == 0
    dev = setup_device("cpu")
    model = dev.prepare_model(model)
    for name, stack in stacks.items():
        expected, _ = _per_slice(model, dev, stack, TilingOptions(tile_size=32, tile_batch=3, tta=True))
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / f"{name}.tif"), expected)


class _FakeDev(DeviceSetup):
    def free_memory_bytes(self) -> int:
        return 8 * 2 ** 30


def test_memory_budget_follows_free_memory_and_autocast_dtype():
    fp32 = _FakeDev(torch.device("cpu"))
    bf16 = _FakeDev(torch.device("cpu"), amp=True, amp_dtype=torch.bfloat16)
    assert free_memory_budget_mb(fp32) == FREE_MEMORY_SHARE * 8 * 1024
    assert free_memory_budget_mb(bf16) == 2 * FREE_MEMORY_SHARE * 8 * 1024
    assert free_memory_budget_mb(setup_device("cpu")) > 0


def test_budget_caps_the_batch():
    """tile_batch 8 of 64x64 tiles of a base-2 'same' model (96 B/px estimated): 1 MB holds 2 tiles."""
    model = balanced_unet("same", probe=68)
    options = TilingOptions(tile_size=64, tile_batch=8, memory_budget_mb=1.0)
    _, batch = StackPredictor(model, setup_device("cpu"), options).plan(200, 200)
    assert batch == int(2 ** 20 // (64 * 64 * 96)) == 2


def test_short_last_batch_is_padded_for_a_given_forward():
    """With ``forward`` (e.g. compiled), every call gets the full batch; the padding never reaches the output."""
    model = balanced_unet("same", probe=68)
    dev = setup_device("cpu")
    shapes = []

    def forward(x):
        shapes.append(tuple(x.shape))
        return model(x)

    stack = np.random.default_rng(2).integers(0, 256, (5, 40, 40), dtype=np.uint8)
    options = TilingOptions(tile_batch=4)
    got = {}
    StackPredictor(model, dev, options, forward=forward).run([stack], lambda k, i, m, p: got.update({k: m.copy()}))
    assert shapes == [(4, 1, 40, 40), (4, 1, 40, 40)]  # 5 one-tile slices: 4 + (1 padded to 4)
    ref, _ = _per_slice(model, dev, stack, options)
    np.testing.assert_array_equal(np.stack([got[k] for k in range(5)]), ref)


@pytest.mark.slow
def test_compile_gives_the_eager_masks(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, balanced_unet("same", probe=68))
    stack = np.random.default_rng(4).integers(0, 256, (5, 40, 56), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "in.tif", stack, photometric="minisblack")
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        assert infer(["--ckpt", str(path), "--input", str(tmp_path / "in.tif"), "--output", str(tmp_path / f"{name}.tif"),
                      "--probabilities", str(tmp_path / f"p_{name}.tif"), "--device", "cpu", "--no-progress",
                      *extra]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "compiled.tif"), tifffile.imread(tmp_path / "eager.tif"))
    np.testing.assert_allclose(tifffile.imread(tmp_path / "p_compiled.tif"), tifffile.imread(tmp_path / "p_eager.tif"),
                               rtol=0, atol=1e-5)


def test_two_class_mask_is_argmax_at_ties_and_nan():
    probs = torch.tensor([[0.3, 0.5, 0.7, float("nan"), 0.2],
                          [0.7, 0.5, 0.3, float("nan"), 0.8]]).reshape(2, 1, 5)
    expected = ((probs.argmax(0) == 1).to(torch.uint8) * 255)
    got = mask_from_probabilities(probs)
    assert got.dtype == torch.uint8 and got.tolist() == expected.tolist() == [[255, 0, 0, 0, 255]]
    three = torch.rand(3, 4, 6)  # more classes: the class map (tests/test_infer_classes.py)
    assert torch.equal(mask_from_probabilities(three), three.argmax(0).to(torch.uint8))


def test_slices_of_another_size_are_refused_naming_the_source():
    model = balanced_unet("same", probe=68)
    chunks = [np.zeros((2, 40, 40), np.uint8), np.zeros((1, 40, 48), np.uint8)]
    with pytest.raises(UserError) as e:
        StackPredictor(model, setup_device("cpu"), TilingOptions()).run(chunks, lambda *a: None, source="in.tif")
    assert str(e.value) == ("in.tif: slice 2 is 48x40 but the stack's first slice is 40x40; "
                            "all slices of a stack must have the same size")
