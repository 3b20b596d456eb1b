"""Training tiles: geometry, image/label alignment under augmentation, determinism, resuming, workers."""
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from unet.data.augment import AUGMENT_LEVELS, AugmentConfig
from unet.data.datasets import SliceSet, load_dataset
from unet.data.sampling import TrainTiles, build_train_loader, default_workers
from unet.data.datasets import synthetic_dataset
from unet.errors import UserError

IN, OUT = 124, 36          # a valid depth-4 'valid' UNet size pair, small enough to keep tests fast


@pytest.fixture(scope="module")
def small_set():
    return synthetic_dataset(count=4, size=96, seed=1)


def _threshold_set(n=3, size=80, seed=0):
    """Images of smooth blobs whose label is exactly ``image > 0.5``."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        f = ndi.gaussian_filter(rng.standard_normal((size, size)), 5)
        img = np.clip(0.5 + f / (4 * f.std()), 0, 1).astype(np.float32)
        images.append(img[None])
        labels.append((img > 0.5).astype(np.uint8))
    return SliceSet(images, labels, [f"t{k}" for k in range(n)], "test")


def test_plain_crop_is_mirror_padded_slice(small_set):
    tiles = TrainTiles(small_set, IN, OUT, augment=False, seed=4)
    m = (IN - OUT) // 2
    for i in range(6):
        rng = np.random.default_rng([4, 0, i])
        k = int(rng.integers(len(small_set)))
        cy, cx = int(rng.integers(96)), int(rng.integers(96))
        top, left = cy - OUT // 2, cx - OUT // 2
        pad = IN
        img = np.pad(small_set.images[k], ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        lab = np.pad(small_set.labels[k], pad, mode="reflect")
        x, y = tiles.sample(i)
        assert x.shape == (1, IN, IN) and x.dtype == torch.float32
        assert y.shape == (OUT, OUT) and y.dtype == torch.uint8  # 8x fewer bytes to the device than int64
        np.testing.assert_array_equal(x.numpy(), img[:, pad + top - m:pad + top - m + IN, pad + left - m:pad + left - m + IN])
        np.testing.assert_array_equal(y.numpy(), lab[pad + top:pad + top + OUT, pad + left:pad + left + OUT])


def test_identity_augmentation_equals_plain_crop(small_set):
    ident = AugmentConfig.geometric_only(flip=False, rot90=False, rotate_deg=0, elastic_std=0)
    plain = TrainTiles(small_set, IN, OUT, augment=False)
    warped = TrainTiles(small_set, IN, OUT, augment=ident)
    for i in range(4):
        (a, la), (b, lb) = plain.sample(i), warped.sample(i)
        assert torch.equal(la, lb)
        assert (a - b).abs().max() < 1e-4


def test_augmented_label_stays_aligned_with_image():
    data = _threshold_set()
    tiles = TrainTiles(data, IN, OUT, augment=AugmentConfig.geometric_only(), seed=2)
    m = (IN - OUT) // 2
    agree, wrong_far, shifted_wrong_far = [], 0, 0
    for i in range(12):
        x, y = tiles.sample(i)
        assert set(torch.unique(y).tolist()) <= {0, 1}
        centre = x[0, m:m + OUT, m:m + OUT]
        # Nearest (label) and bicubic (image) sampling may differ only where the image is near the threshold.
        far = (centre - 0.5).abs() > 0.1
        agree.append(((centre > 0.5).long() == y).float().mean().item())
        wrong_far += ((centre > 0.5).long() != y)[far].sum().item()
        shifted = torch.roll(centre, 3, dims=1)
        shifted_wrong_far += ((shifted > 0.5).long() != y)[(shifted - 0.5).abs() > 0.1].sum().item()
    assert min(agree) > 0.96, agree
    assert wrong_far == 0
    assert shifted_wrong_far > 12 * OUT * OUT * 0.02, shifted_wrong_far


def _dihedral(t: torch.Tensor):
    """The 8 flips/quarter turns of the last two dimensions, by name."""
    for k in range(4):
        r = torch.rot90(t, k, dims=(-2, -1))
        yield f"rot{k}", r
        yield f"rot{k}+flip", torch.flip(r, dims=(-1,))


def test_weight_map_travels_with_the_label_through_flips_and_quarter_turns(small_set):
    # A random weight map (no structure, so only the true transform matches) and a plain-crop twin with the
    # same seed: same slice and window, drawn before the augmentation.
    rng = np.random.default_rng(5)
    maps = [rng.random(lab.shape).astype(np.float32) for lab in small_set.labels]
    plain = TrainTiles(small_set, IN, OUT, augment=False, seed=3, weights=maps)
    turns = TrainTiles(small_set, IN, OUT, seed=3, weights=maps,
                       augment=AugmentConfig.geometric_only(rotate_deg=0, elastic_std=0))
    seen = set()
    for i in range(16):
        (x, y, w), (ax, ay, aw) = plain.sample(i), turns.sample(i)
        assert w.dtype == torch.float32 and w.shape == y.shape == (OUT, OUT)
        # 1e-4: grid_sample's normalised coordinates land within ~1e-5 px of the integer pixel positions.
        matches = [name for name, tw in _dihedral(w) if (tw - aw).abs().max() < 1e-4]
        assert len(matches) == 1, (i, matches)
        name = matches[0]
        seen.add(name)
        assert torch.equal(dict(_dihedral(y))[name], ay)  # the label took the same turn
        assert (dict(_dihedral(x))[name] - ax).abs().max() < 1e-4  # and the image
    assert len(seen) >= 4, seen  # the test saw several different transforms


def test_plain_crop_weights_are_the_mirror_padded_map(small_set):
    maps = [np.arange(lab.size, dtype=np.float32).reshape(lab.shape) for lab in small_set.labels]
    tiles = TrainTiles(small_set, IN, OUT, augment=False, seed=4, weights=maps)
    for i in range(4):
        rng = np.random.default_rng([4, 0, i])
        k = int(rng.integers(len(small_set)))
        top, left = int(rng.integers(96)) - OUT // 2, int(rng.integers(96)) - OUT // 2
        padded = np.pad(maps[k], IN, mode="reflect")
        _, _, w = tiles.sample(i)
        np.testing.assert_array_equal(w.numpy(), padded[IN + top:IN + top + OUT, IN + left:IN + left + OUT])
    images, labels, weights = tiles.batch(0, 3)
    assert weights.shape == labels.shape == (3, OUT, OUT)


def test_augmented_weights_are_bilinear_between_label_weights(small_set):
    # Weights that are a function of the label (1 on membrane, 5 on cells): under rotation and elastic warps the
    # bilinear weight lies between the two values and equals the label's own weight away from borders.
    maps = [np.where(lab == 1, 5.0, 1.0).astype(np.float32) for lab in small_set.labels]
    tiles = TrainTiles(small_set, IN, OUT, augment=AugmentConfig.geometric_only(), seed=6, weights=maps)
    agree, shifted = [], []
    for i in range(6):
        _, y, w = tiles.sample(i)
        assert w.min() >= 1.0 - 1e-5 and w.max() <= 5.0 + 1e-5
        agree.append(((w - torch.where(y == 1, 5.0, 1.0)).abs() < 0.5).float().mean().item())
        # Misaligned by 3 px the same comparison fails on the thin membranes: the check can tell.
        shifted.append(((torch.roll(w, 3, 1) - torch.where(y == 1, 5.0, 1.0)).abs() < 0.5).float().mean().item())
    assert min(agree) > 0.85 and np.mean(shifted) < np.mean(agree) - 0.05, (agree, shifted)


def test_augmentation_changes_geometry_and_grey_values(small_set):
    plain = TrainTiles(small_set, IN, OUT, augment=False)
    aug = TrainTiles(small_set, IN, OUT, augment=True)
    diffs = [(plain.sample(i)[1] != aug.sample(i)[1]).float().mean().item() for i in range(6)]
    assert np.mean(diffs) > 0.05
    # The grey-value draws come after the geometric ones, so the same seed gives the same warp.
    geometric = TrainTiles(small_set, IN, OUT, augment=AugmentConfig.geometric_only())
    for i in range(6):
        (x, y), (gx, gy) = aug.sample(i), geometric.sample(i)
        assert torch.equal(y, gy)
        assert (x - gx).abs().mean() > 0.01
        assert 0.0 <= x.min() and x.max() <= 1.0


def test_real_isbi_tiles_at_reference_size(isbi_dir):
    ds = load_dataset(isbi_dir).subset([0, 1])
    tiles = TrainTiles(ds, 572, 388, seed=0)
    x, y = tiles.sample(0)
    assert x.shape == (1, 572, 572) and y.shape == (388, 388)
    assert 0.6 < y.float().mean() < 0.9     # ISBI is ~78 % cell interior
    m = 92
    dark = 1 - x[0, m:m + 388, m:m + 388]
    corr = np.corrcoef(dark.ravel().numpy(), (y == 0).float().ravel().numpy())[0, 1]
    assert corr > 0.3, corr


def test_determinism_ranks_and_resume(small_set):
    a = TrainTiles(small_set, IN, OUT, seed=7)
    b = TrainTiles(small_set, IN, OUT, seed=7)
    for i in (0, 5):
        assert all(torch.equal(u, v) for u, v in zip(a.sample(i), b.sample(i)))
    other_seed = TrainTiles(small_set, IN, OUT, seed=8)
    rank1 = TrainTiles(small_set, IN, OUT, seed=7, rank=1, world_size=2)
    assert not torch.equal(a.sample(0)[0], other_seed.sample(0)[0])
    assert not torch.equal(a.sample(0)[0], rank1.sample(0)[0])
    stream = iter(a)
    first = [next(stream) for _ in range(5)]
    resumed = iter(TrainTiles(small_set, IN, OUT, seed=7, start_index=3))
    for want in first[3:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_loader_workers_0_and_2_identical_and_resumable(small_set):
    tiles = TrainTiles(small_set, IN, OUT, seed=3)
    want = [tiles.batch(b, 3) for b in range(5)]
    for workers in (0, 2):
        loader = build_train_loader(tiles, batch_size=3, workers=workers, pin_memory=False)
        it = iter(loader)
        got = [next(it) for _ in range(5)]
        del it
        for (gx, gy), (wx, wy) in zip(got, want):
            assert gx.shape == (3, 1, IN, IN) and gy.shape == (3, OUT, OUT)
            assert torch.equal(gx, wx) and torch.equal(gy, wy)
    resumed = TrainTiles(small_set, IN, OUT, seed=3, start_index=2 * 3)
    rx, ry = next(iter(build_train_loader(resumed, batch_size=3, workers=0, pin_memory=False)))
    assert torch.equal(rx, want[2][0]) and torch.equal(ry, want[2][1])


def test_per_sample_worker_split_matches_serial(small_set):
    tiles = TrainTiles(small_set, IN, OUT, augment=False, seed=1)
    loader = torch.utils.data.DataLoader(tiles, batch_size=None, num_workers=2)
    it = iter(loader)
    got = [next(it) for _ in range(4)]
    del it
    for i, (x, y) in enumerate(got):
        wx, wy = tiles.sample(i)
        assert torch.equal(x, wx) and torch.equal(y, wy)


def test_bad_arguments(small_set):
    unlabelled = SliceSet(small_set.images, None, small_set.names, "mydata")
    with pytest.raises(UserError, match=r"mydata: training needs labels, and this data set has none"):
        TrainTiles(unlabelled, IN, OUT)
    with pytest.raises(UserError, match=r"no slices to train on"):
        TrainTiles(small_set.subset([]), IN, OUT)
    with pytest.raises(ValueError, match=r"even difference"):
        TrainTiles(small_set, 125, OUT)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\)"):
        TrainTiles(small_set, IN, OUT, rank=2, world_size=2)


@pytest.mark.parametrize("cpus, workers", [(1, 0), (4, 3), (32, 8)])
def test_default_workers_on_an_accelerator_leave_one_cpu_to_the_trainer(monkeypatch, cpus, workers):
    monkeypatch.setattr("unet.data.sampling.usable_cpus", lambda: cpus)
    assert default_workers("cuda") == workers
    assert default_workers("npu") == workers


@pytest.mark.parametrize("cpus", [1, 2, 64])
def test_default_workers_on_the_cpu_build_batches_in_the_training_process(monkeypatch, cpus):
    monkeypatch.setattr("unet.data.sampling.usable_cpus", lambda: cpus)
    assert default_workers("cpu") == 0


def test_augment_levels_name_the_configs_the_tests_above_check():
    assert AUGMENT_LEVELS == ("full", "geometric", "flips")
    assert AugmentConfig.level("full") == AugmentConfig()
    assert AugmentConfig.level("geometric") == AugmentConfig.geometric_only()
    # flips: exactly the flips-and-quarter-turns config whose lossless transforms are checked above
    flips = AugmentConfig.level("flips")
    assert flips == AugmentConfig.geometric_only(rotate_deg=0, elastic_std=0)
    assert flips.flip and flips.rot90 and not (flips.rotate_deg or flips.elastic_std or flips.gamma or flips.noise_prob)
    with pytest.raises(ValueError, match="augment level must be one of"):
        AugmentConfig.level("strong")
