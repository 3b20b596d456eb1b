"""Training-tile loader throughput vs. the reference model's CPU training speed.

    python benchmarks/loader_throughput.py [--data-dir DIR] [--seconds 5] [--quick]

Prints (1) per-sample cost of candidate augmentation back ends on one core, (2) samples/s of the real
loader (``build_train_loader``) for 0, 1, 2 workers with and without augmentation at the reference tile
size (572 -> 388), and (3) images/s of ``UNet()`` training steps as train.py takes them (``train_step``:
CE+Dice, backward, Adam) at batch 1, fp32, on this CPU.
``--quick`` shrinks everything (124 -> 36 tiles, a tiny UNet) for a smoke test.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from common import machine_header  # noqa: E402

from unet.data.augment import AugmentConfig, _upsample_matrix, random_affine, sampling_grid, warp  # noqa: E402
from unet.data.datasets import load_dataset  # noqa: E402
from unet.data.sampling import TrainTiles, build_train_loader  # noqa: E402
from unet.device import DeviceSetup, setup_device  # noqa: E402
from unet.model import UNet  # noqa: E402
from unet.training.trainer import train_step  # noqa: E402


def per_call_ms(fn, seconds: float, min_calls: int = 3) -> float:
    fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls * 1000


def backend_candidates(image: np.ndarray, label: np.ndarray, size: int, out: int, cfg: AugmentConfig):
    """The same random flip + rotation + elastic warp of one tile done by each candidate back end."""
    h, w = image.shape
    timg = torch.from_numpy(image)[None]
    tlab = torch.from_numpy(label.astype(np.float32))[None]
    m = (size - out) // 2
    rng = np.random.default_rng(0)

    def grid_sample(mode):
        def run():
            grid = sampling_grid(rng, cfg, size, (h / 2, w / 2), (h, w))
            warp(timg, grid, mode)
            warp(tlab, grid[:, m:m + out, m:m + out], "nearest")
        return run

    r = np.arange(size, dtype=np.float32) - (size - 1) / 2
    up = _upsample_matrix(size, cfg.elastic_grid).numpy()

    def map_coordinates(order):
        # Spline coefficients of the whole slice are computed once, as a real loader would cache them.
        prefiltered = ndi.spline_filter(image, order=order, mode="mirror") if order > 1 else image

        def run():
            a = random_affine(rng, cfg)
            coarse = rng.normal(0.0, cfg.elastic_std, (2, cfg.elastic_grid, cfg.elastic_grid)).astype(np.float32)
            sy = a[0, 0] * r[:, None] + a[0, 1] * r[None, :] + h / 2 + up @ coarse[0] @ up.T
            sx = a[1, 0] * r[:, None] + a[1, 1] * r[None, :] + w / 2 + up @ coarse[1] @ up.T
            coords = np.stack([sy, sx])
            ndi.map_coordinates(prefiltered, coords, order=order, mode="mirror", prefilter=False)
            ndi.map_coordinates(label, coords[:, m:m + out, m:m + out], order=0, mode="mirror")
        return run

    from torchvision import tv_tensors
    from torchvision.transforms import v2
    chain = v2.Compose([v2.RandomCrop(size, pad_if_needed=True, padding_mode="reflect"),
                        v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                        v2.RandomRotation(cfg.rotate_deg), v2.ElasticTransform(alpha=50.0, sigma=5.0)])
    mask = tv_tensors.Mask(torch.from_numpy(label)[None])

    return {
        "grid_sample one-shot, bicubic (chosen)": grid_sample("bicubic"),
        "grid_sample one-shot, bilinear": grid_sample("bilinear"),
        "scipy map_coordinates one-shot, order 3": map_coordinates(3),
        "scipy map_coordinates one-shot, order 1": map_coordinates(1),
        "torchvision v2 chain (flip, rotate, elastic)": lambda: chain(timg, mask),
    }


def loader_rate(tiles: TrainTiles, batch: int, workers: int, seconds: float) -> float:
    loader = build_train_loader(tiles, batch, workers, pin_memory=False)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < seconds:
        next(it)
        n += 1
    rate = n * batch / (time.perf_counter() - start)
    del it, loader
    return rate


def model_rate(model: UNet, dev: DeviceSetup, size: int, seconds: float) -> tuple[float, int]:
    """Training steps/s at batch 1 as train.py takes them: ``train_step`` (CE+Dice, backward) with Adam."""
    model = dev.prepare_model(model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-4)
    scaler = dev.grad_scaler()
    x = torch.rand(1, model.config.in_channels, size, size)
    out = model.output_size(size)
    y = torch.randint(0, model.config.num_classes, (1, out, out))

    def step():
        train_step(model, x, y, optimizer, scaler, dev)

    step()  # warm-up: allocator and kernel selection
    steps, start = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps / (time.perf_counter() - start), steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="ISBI-layout data (default: built-in synthetic set)")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny tiles and model, for a smoke test")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.quick:
        size, out, seconds, batch = 124, 36, min(args.seconds, 0.3), 2
        model = UNet(base_filters=4, depth=4)
        slices = load_dataset(None).subset(range(4)) if args.data_dir is None else load_dataset(args.data_dir)
    else:
        size, out, seconds, batch = 572, 388, args.seconds, args.batch_size
        model = UNet()
        slices = load_dataset(args.data_dir)

    dev = setup_device("cpu")
    print(machine_header("loader throughput", dev))
    print(f"# data: {slices.source} ({len(slices)} slices)  tile {size} -> {out}  batch {batch}  "
          f"{seconds:g} s per measurement")

    print("\naugmentation back end (one tile + label, main process, 1 thread)   ms/sample")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    img0, lab0 = slices.images[0][0], slices.labels[0]
    for name, fn in backend_candidates(img0, lab0, size, out, AugmentConfig()).items():
        print(f"  {name:<60s} {per_call_ms(fn, seconds / 2):8.1f}")
    torch.set_num_threads(threads)

    print("\nloader (build_train_loader)   workers   augment   samples/s")
    for augment in (False, True):
        for workers in (0, 1, 2):
            tiles = TrainTiles(slices, size, out, augment=augment, seed=0)
            rate = loader_rate(tiles, batch, workers, seconds)
            print(f"  {'':<28s}{workers:>7d}   {'on' if augment else 'off':>7s}   {rate:9.1f}")

    rate, steps = model_rate(model, dev, size, seconds)
    params = sum(p.numel() for p in model.parameters())
    print(f"\nmodel: UNet ({params / 1e6:.1f} M params) training step (CE+Dice, backward, Adam), batch 1, fp32, "
          f"{size}x{size}, {torch.get_num_threads()} threads: {rate:.3f} images/s ({steps} steps, "
          f"{1 / rate:.2f} s/step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
