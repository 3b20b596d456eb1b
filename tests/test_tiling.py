"""Tiled whole-slice prediction: exact answers with known predictors, and real small UNets."""
import math

import numpy as np
import pytest
import torch

from unet.errors import UserError
from unet.model import UNet
from unet.prediction.tiles import mirror_pad, predict_slice
from unet.prediction.tiling import TilePlan, TilingOptions, choose_tile_size, estimate_bytes_per_pixel, plan_tiles

SIZES = [(512, 512), (300, 700), (97, 1000)]


class MarginGeometry:
    """A 'valid' network that trims ``margin`` pixels per side; valid inputs are 2 * margin + align * k."""

    padding = "valid"

    def __init__(self, margin, align=1):
        self.margin, self.align = margin, align

    def output_size(self, n):
        if n <= 2 * self.margin or (n - 2 * self.margin) % self.align:
            raise ValueError(f"invalid input size {n}")
        return n - 2 * self.margin

    def valid_input_size(self, n):
        k = max(1, math.ceil((n - 2 * self.margin) / self.align))
        return 2 * self.margin + k * self.align

    def input_size_for_output(self, n):
        return self.valid_input_size(n + 2 * self.margin)


class SameGeometry:
    """A 'same' network whose valid input sizes are multiples of ``align``."""

    padding = "same"

    def __init__(self, align=16):
        self.align = align

    def output_size(self, n):
        if n < 1 or n % self.align:
            raise ValueError(f"invalid input size {n}")
        return n

    def valid_input_size(self, n):
        return max(1, math.ceil(n / self.align)) * self.align

    def input_size_for_output(self, n):
        return self.valid_input_size(n)


def _crop(m):
    return lambda x: x[..., m:-m, m:-m]


def _image(h, w, c=2):
    return torch.rand(c, h, w)


# --- choose_tile_size ---------------------------------------------------------------------------------

def test_reference_unet_512_is_one_716_tile():
    # 700 -> 516 would cover the slice, but its last 15 rows/columns (the edge band) would fall inside it.
    plan = choose_tile_size(512, 512, UNet())
    assert (plan.tile_size, plan.output_size, plan.tiles_y, plan.tiles_x) == (716, 532, 1, 1)
    assert "716x716" in str(plan)
    assert plan_tiles(512, 512, UNet(), 700).num_tiles == 4  # with a 700 tile: a second, aligned tile per axis


@pytest.mark.parametrize("depth", [3, 5])
def test_no_edge_band_falls_inside_the_slice(depth):
    """Every valid plan puts the last tile's edge band beyond the slice (it used to fall inside a one-tile slice)."""
    model = UNet(depth=depth, base_filters=4)
    band = model.edge_band
    for length in range(1, 700, 7):
        for tile in (None, model.input_size_for_output(40), model.input_size_for_output(length)):
            if tile is None:
                plan = choose_tile_size(length, 33, model)
            else:
                try:
                    plan = plan_tiles(length, 33, model, tile)
                except UserError:  # a tile whose output is no wider than the band
                    continue
            assert plan.starts_y[-1] + plan.output_size - band >= length, (length, tile, plan)
            # no gap: every tile starts where the previous tile's clean output still covers
            clean = plan.output_size - band
            assert all(b - a <= clean for a, b in zip(plan.starts_y, plan.starts_y[1:]))


def _brute_force_cost(h, w, geometry, budget_mb, overlap=0.25):
    """Least input pixels x tiles over every valid tile size up to 2048 that fits the budget."""
    bpp = estimate_bytes_per_pixel(geometry)
    sizes = sorted({geometry.valid_input_size(n) for n in range(1, 2049)})
    best = math.inf
    for size in sizes:
        if size * size * bpp > budget_mb * 2 ** 20:
            continue
        try:
            plan = plan_tiles(h, w, geometry, size, TilingOptions(overlap=overlap))
        except (UserError, ValueError):  # no output, or no output beyond the edge band
            continue
        best = min(best, size * size * plan.num_tiles)
    return best


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("hw", SIZES)
def test_chosen_tiling_is_cheapest_and_covers(padding, hw):
    model = UNet(padding=padding)
    h, w = hw
    plan = choose_tile_size(h, w, model)
    assert plan.tile_size ** 2 * plan.num_tiles == _brute_force_cost(h, w, model, 2048)
    assert plan.tile_size * plan.tile_size * estimate_bytes_per_pixel(model) <= 2048 * 2 ** 20
    assert plan.starts_y[-1] + plan.output_size >= h and plan.starts_x[-1] + plan.output_size >= w
    assert plan.tiles_y == len(plan.starts_y) and plan.tiles_x == len(plan.starts_x)


def test_known_tilings():
    model = UNet()
    assert choose_tile_size(300, 700, model) == TilePlan(556, 372, 1, 2)
    assert choose_tile_size(97, 1000, model) == TilePlan(460, 276, 1, 4)


def test_small_budget_forces_a_split():
    model = UNet()
    plan = choose_tile_size(512, 512, model, TilingOptions(memory_budget_mb=512))
    assert plan.num_tiles > 1
    assert plan.tile_size ** 2 * 2048 <= 512 * 2 ** 20
    with pytest.raises(UserError, match="memory budget"):
        choose_tile_size(512, 512, model, TilingOptions(memory_budget_mb=1))


def test_valid_tile_offsets_are_aligned():
    plan = plan_tiles(1000, 1000, UNet(), 572)
    assert plan.output_size == 388
    assert all(s % 16 == 0 for s in plan.starts_y)
    assert plan.starts_y[-1] + 388 >= 1000 and plan.starts_y[-1] < 1000


def test_invalid_tile_size_and_options_raise_user_errors():
    with pytest.raises(UserError, match="572"):
        plan_tiles(512, 512, UNet(), 570)
    with pytest.raises(UserError):
        plan_tiles(512, 512, UNet(padding="same"), 500)
    with pytest.raises(UserError):
        predict_slice(_crop(2), _image(8, 8), TilingOptions(overlap=1.0), geometry=MarginGeometry(2))
    with pytest.raises(UserError):
        predict_slice(_crop(2), _image(8, 8), TilingOptions(blend="linear"), geometry=MarginGeometry(2))
    with pytest.raises(ValueError, match="geometry"):
        predict_slice(lambda x: x, _image(8, 8))


# --- mirror padding ----------------------------------------------------------------------------------

def test_mirror_pad_matches_torch_and_numpy():
    x = torch.rand(2, 7, 9)
    assert torch.equal(mirror_pad(x, 3, 2, 4, 1), torch.nn.functional.pad(x, (4, 1, 3, 2), mode="reflect"))
    # Pads wider than the image bounce back and forth, like numpy's reflect.
    big = mirror_pad(x, 20, 15, 30, 3)
    ref = np.pad(x.numpy(), ((0, 0), (20, 15), (30, 3)), mode="reflect")
    assert np.array_equal(big.numpy(), ref)


# --- exact answers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("align", [1, 16])
@pytest.mark.parametrize("hw", SIZES)
def test_valid_crop_predictor_reproduces_image_exactly(hw, align):
    m = 20
    geometry = MarginGeometry(m, align)
    img = _image(*hw)
    for tile_size in (None, geometry.valid_input_size(2 * m + 90)):
        out = predict_slice(_crop(m), img, TilingOptions(tile_size=tile_size), geometry=geometry)
        assert out.dtype == torch.float32 and out.shape == img.shape
        assert torch.equal(out, img)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("hw", SIZES)
def test_same_identity_predictor_blends_back_to_image(hw, blend):
    img = _image(*hw)
    for tile_size in (None, 64):
        out = predict_slice(lambda x: x, img, TilingOptions(tile_size=tile_size, blend=blend),
                            geometry=SameGeometry(16))
        assert out.shape == img.shape
        assert torch.allclose(out, img, atol=1e-6, rtol=0)


def test_same_image_smaller_than_tile_is_padded_and_cropped():
    img = _image(20, 30)
    out = predict_slice(lambda x: x, img, TilingOptions(tile_size=64, blend="constant"), geometry=SameGeometry(16))
    assert torch.equal(out, img)


def test_tiles_are_batched():
    calls = []

    def predictor(x):
        calls.append(x.shape[0])
        return x[..., 5:-5, 5:-5]

    img = _image(97, 1000)
    out = predict_slice(predictor, img, TilingOptions(tile_size=110, tile_batch=4), geometry=MarginGeometry(5))
    assert torch.equal(out, img)
    assert sum(calls) == 10 and calls == [4, 4, 2]
    # A memory budget that holds only one tile per call lowers the batch.
    calls.clear()
    budget = 110 * 110 * 2048 * 1.5 / 2 ** 20
    predict_slice(predictor, img, TilingOptions(tile_size=110, tile_batch=4, memory_budget_mb=budget),
                  geometry=MarginGeometry(5))
    assert calls == [1] * 10


def test_num_outputs_and_output_shape_are_checked():
    img = _image(40, 40)
    with pytest.raises(ValueError, match="num_outputs"):
        predict_slice(_crop(4), img, geometry=MarginGeometry(4), num_outputs=3)
    with pytest.raises(ValueError, match="geometry expects"):
        predict_slice(lambda x: x, img, geometry=MarginGeometry(4))


# --- real small models -------------------------------------------------------------------------------

def _small_unet(padding):
    torch.manual_seed(0)
    return UNet(base_filters=4, depth=3, padding=padding, in_channels=1).eval()


@pytest.mark.parametrize("depth", [3, 4])
def test_valid_unet_tiles_equal_one_pass_over_mirror_padded_image(depth):
    # The overlap-tile guarantee: stitching small tiles reproduces one forward pass over the whole
    # mirror-padded slice (spanning the tiling's extent, so both see the same bottom/right edge).
    torch.manual_seed(0)
    model = UNet(base_filters=4, depth=depth, padding="valid").eval()
    h, w = 100, 130
    img = torch.rand(1, h, w)
    tile = model.input_size_for_output(36)
    plan = plan_tiles(h, w, model, tile)
    assert plan.tiles_y > 1 and plan.tiles_x > 2
    tiled = predict_slice(model, img, TilingOptions(tile_size=tile, tile_batch=3))
    margin = (tile - model.output_size(tile)) // 2
    extent_y, extent_x = plan.starts_y[-1] + plan.output_size, plan.starts_x[-1] + plan.output_size
    padded = mirror_pad(img, margin, extent_y - h + margin, margin, extent_x - w + margin)
    with torch.no_grad():
        full = model(padded[None])[0]
    assert full.shape[-2:] == (extent_y, extent_x)
    assert tiled.shape == (2, h, w)
    assert torch.allclose(tiled, full[:, :h, :w], atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw", [(40, 40), (45, 61), (29, 52)])
def test_one_tile_slice_equals_the_same_region_inside_a_larger_image(hw):
    """The edge band fix: a slice predicted as one tile equals that region of a larger image holding the slice
    and its mirror image beyond the bottom/right edge (what the mirror padding shows the tile), within the
    model's context; before the fix the last edge-band rows/columns read the transposed convolutions' zeros."""
    torch.manual_seed(0)
    model = UNet(base_filters=4, depth=3, padding="valid").eval()  # edge band 3
    h, w = hw
    img = torch.rand(1, h, w)
    plan = choose_tile_size(h, w, model)
    assert plan.num_tiles == 1
    larger = mirror_pad(img, 0, 3 * h, 0, 3 * w)  # slice, then its mirror image: the context the padding gives
    small = predict_slice(model, img)
    big = predict_slice(model, larger)[:, :h, :w]
    assert torch.allclose(small, big, atol=1e-5, rtol=0)
    band = model.edge_band
    assert (small[:, -band:] - big[:, -band:]).abs().max() < 1e-5  # the rows the band used to spoil


def test_same_unet_single_window_equals_full_pass_and_tiles_are_close():
    model = _small_unet("same")
    img = torch.rand(1, 64, 64)
    with torch.no_grad():
        full = model(img[None])[0]
    one = predict_slice(model, img, TilingOptions(tile_size=64, blend="constant"))
    assert torch.allclose(one, full, atol=1e-6, rtol=0)
    # Smaller windows see zero padding at their borders, so they only approximate the full pass.
    for blend in ("constant", "gaussian"):
        tiled = predict_slice(model, img, TilingOptions(tile_size=32, blend=blend, overlap=0.5))
        # (10 %: an untrained He-initialised net amplifies the border differences of zero padding.)
        assert (tiled - full).abs().mean() < 0.1 * full.abs().mean()


# --- test-time augmentation --------------------------------------------------------------------------

def test_tta_with_equivariant_predictor_is_exact():
    img = _image(97, 300)
    out = predict_slice(_crop(6), img, TilingOptions(tile_size=80, tta=True), geometry=MarginGeometry(6))
    assert torch.equal(out, img)
    out = predict_slice(lambda x: x, img, TilingOptions(tile_size=64, tta=True), geometry=SameGeometry(16))
    assert torch.allclose(out, img, atol=1e-6, rtol=0)


def test_tta_of_real_model_lies_between_single_predictions():
    model = _small_unet("valid")
    img = torch.rand(1, 50, 70)
    tile = model.input_size_for_output(40)

    def transformed(k, flip):
        def predictor(x):
            x = torch.rot90(x, k, dims=(-2, -1))
            y = model(x.flip(-1) if flip else x)
            return torch.rot90(y.flip(-1) if flip else y, -k, dims=(-2, -1))
        return predictor

    singles = torch.stack([predict_slice(transformed(k, f), img, TilingOptions(tile_size=tile), geometry=model)
                           for f in (False, True) for k in range(4)])
    tta = predict_slice(model, img, TilingOptions(tile_size=tile, tta=True))
    assert not torch.allclose(singles[0], singles[1])  # the model is not equivariant: TTA does something
    assert (tta >= singles.min(0).values - 1e-6).all() and (tta <= singles.max(0).values + 1e-6).all()
    assert torch.allclose(tta, singles.mean(0), atol=1e-6)


def test_tile_size_over_the_memory_budget_is_refused_up_front():
    from unet.prediction.tiling import check_tile_budget, largest_tile_size, slice_plan
    model = UNet()  # reference: valid padding, 64 filters -> 2048 bytes per input pixel
    bpp = estimate_bytes_per_pixel(model)
    largest = largest_tile_size(model)
    assert largest == model.valid_input_size(largest) and largest ** 2 * bpp <= 2048 * 2 ** 20
    assert model.valid_input_size(largest + 1) ** 2 * bpp > 2048 * 2 ** 20  # the next valid size is over
    check_tile_budget(model, largest)
    with pytest.raises(UserError) as e:
        slice_plan(512, 512, model, TilingOptions(tile_size=1000000))
    message = str(e.value)
    assert message.startswith("--tile-size 1000000 needs about 1,953,125,000 MB")
    assert "memory budget of 2048 MB" in message and f"largest tile size allowed for this model is {largest}" in message
    with pytest.raises(UserError, match=f"budget of 100 MB; the largest tile size allowed for this model is "
                                        f"{largest_tile_size(model, 100)} "):
        slice_plan(512, 512, model, TilingOptions(tile_size=largest, memory_budget_mb=100))
    with pytest.raises(UserError, match="not even the smallest tile"):
        check_tile_budget(model, 188, memory_budget_mb=1)
