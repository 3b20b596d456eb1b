"""Block-wise prediction with a halo (unet.prediction.blocks): chunk-aligned blocks whose stitched output is the
whole slice's, bit for bit where the forward passes see the same batches; memory bounded by the block."""
import math

import pytest
import torch

from unet.model import UNet
from unet.prediction.blocks import block_grid, block_shape_for, block_tile_plan, predict_blocks
from unet.prediction.tiles import predict_slice, predict_tiles
from unet.prediction.tiling import TilingOptions, edge_band, slice_plan


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions; shared cores (conftest)


def _model(padding: str, depth: int = 3) -> UNet:
    torch.manual_seed(0)
    return UNet(base_filters=4, depth=depth, padding=padding).eval()


def _blockwise(model, image: torch.Tensor, options: TilingOptions, chunks, block, batch: int) -> tuple:
    """Predict ``image`` (C, H, W) block by block; returns (result, grid, read boxes)."""
    _, h, w = image.shape
    grid = block_grid((1, h, w), block_shape_for(chunks, block, (h, w)), model, options)
    out = torch.full((model.config.num_classes, h, w), float("nan"))
    reads = []

    def read(b):
        y0, y1, x0, x1 = b.read_box
        reads.append(b.read_box)
        return image[:, y0:y1, x0:x1].clone()  # a copy: the block never sees the rest of the slice

    def finish(b, probs):
        y0, y1, x0, x1 = b.write_box
        assert torch.isnan(out[:, y0:y1, x0:x1]).all()  # written once
        out[:, y0:y1, x0:x1] = probs

    predictor = lambda x: model(x).softmax(1)  # noqa: E731
    with torch.no_grad():
        n = predict_blocks(grid, grid, read, lambda t: predict_tiles(predictor, t, options.tta), finish, batch,
                           blend=options.blend if model.padding == "same" else None, num_outputs=2)
    assert n == len(grid)
    return out, grid, reads


CASES = [  # padding, slice, tiling, chunks, block
    ("valid", (70, 93), dict(tile_size=60), (16, 16), (20, 40)),
    ("valid", (45, 61), dict(), (8, 8), (16, 16)),  # the one-tile plan, cut into blocks
    ("same", (70, 93), dict(tile_size=24, overlap=0.5), (16, 16), (20, 40)),
    ("same", (70, 93), dict(tile_size=32, blend="constant"), (10, 12), (10, 12)),
    ("same", (20, 27), dict(tile_size=32), (8, 8), (8, 8)),  # a slice smaller than the window: mirror-padded
]


@pytest.mark.parametrize("padding, hw, tiling, chunks, block", CASES)
def test_blocks_equal_the_whole_slice_bit_for_bit(padding, hw, tiling, chunks, block):
    model = _model(padding)
    image = torch.rand(1, *hw)
    if "tile_size" not in tiling:  # the whole slice's own (one-tile) plan, given explicitly to the blocks
        tiling = dict(tiling, tile_size=slice_plan(*hw, model).tile_size)
        assert slice_plan(*hw, model).num_tiles == 1
    options = TilingOptions(tile_batch=1, **tiling)
    whole = predict_slice(lambda x: model(x).softmax(1), image, options, geometry=model)
    blocks, grid, _ = _blockwise(model, image, options, chunks, block, batch=1)
    assert len(grid) > 1
    assert torch.equal(blocks, whole)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_blocks_with_tta_and_batches_across_blocks(padding):
    """Batches of 3 tiles taken across blocks: the forward passes' batch sizes differ from the slice's, so the
    convolution may round differently (~1e-7); the masks agree."""
    model = _model(padding)
    image = torch.rand(1, 70, 93)
    options = TilingOptions(tile_batch=3, tta=True, tile_size=60 if padding == "valid" else 32)
    whole = predict_slice(lambda x: model(x).softmax(1), image, options, geometry=model)
    blocks, _, _ = _blockwise(model, image, options, (16, 16), (32, 32), batch=3)
    assert (blocks - whole).abs().max() < 1e-6
    assert torch.equal(blocks[1] > blocks[0], whole[1] > whole[0])


def test_write_boxes_are_chunk_aligned_disjoint_and_cover_the_volume():
    model = _model("valid")
    grid = block_grid((3, 100, 77), block_shape_for((16, 12), (40, 30), (100, 77)), model, TilingOptions(tile_size=60))
    assert grid.block_shape == (48, 36)  # rounded up to whole chunks
    covered = torch.zeros(3, 100, 77, dtype=torch.int32)
    for b in grid:
        y0, y1, x0, x1 = b.write_box
        assert y0 % 16 == 0 and x0 % 12 == 0
        assert (y1 % 16 == 0 or y1 == 100) and (x1 % 12 == 0 or x1 == 77)
        ry0, ry1, rx0, rx1 = b.read_box
        assert 0 <= ry0 and ry1 <= 100 and 0 <= rx0 and rx1 <= 77
        covered[b.z, y0:y1, x0:x1] += 1
    assert (covered == 1).all()  # no chunk is written by two blocks
    assert [b.index for b in grid] == list(range(len(grid))) == [grid.block(i).index for i in range(len(grid))]


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_read_box_depends_on_the_block_not_the_slice(padding):
    """Memory bounded by the block: the largest read box is the same for a slice 10x larger."""
    model = _model(padding)
    options = TilingOptions(tile_size=60 if padding == "valid" else 32)
    for side in (200, 2000):
        grid = block_grid((1, side, side), (64, 64), model, options)
        largest = max((b.read_box[1] - b.read_box[0]) * (b.read_box[3] - b.read_box[2]) for b in grid)
        assert largest <= (64 + 2 * 60) ** 2 < 200 * 200  # block + halo on each side (tile-sized at most)
        assert max(b.num_tiles for b in grid) <= (64 // 16 + 2) ** 2


def _plan_key(plan):
    return plan.tile_size, plan.output_size, plan.starts_y, plan.starts_x


def test_a_slice_within_one_block_keeps_the_whole_slice_plan():
    model = UNet()  # the reference geometry
    for block in ((4096, 4096), (512, 512)):
        assert _plan_key(block_tile_plan(512, 512, model, None, block)) == _plan_key(slice_plan(512, 512, model))


def test_larger_slices_get_a_tile_chosen_for_the_blocks():
    """A tile reaching two blocks is computed twice: the block plan counts that, and costs no more than the
    whole-slice plan's tile would under the same blocks."""
    model = UNet()
    block = (2048, 2048)
    options = TilingOptions(memory_budget_mb=8192)

    def work(plan):
        grid = block_grid((1, 6000, 6000), block, model, TilingOptions(tile_size=plan.tile_size,
                                                                         memory_budget_mb=8192))
        return plan.tile_size ** 2 * sum(b.num_tiles for b in grid)

    chosen = block_tile_plan(6000, 6000, model, options, block)
    assert work(chosen) <= work(slice_plan(6000, 6000, model, options))
    assert chosen.starts_y[-1] + chosen.output_size - edge_band(model, chosen.tile_size) >= 6000
    assert math.isfinite(work(chosen))
