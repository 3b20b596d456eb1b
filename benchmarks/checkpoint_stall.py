"""How long a checkpoint save blocks the training loop: synchronous save_checkpoint vs BackgroundCheckpointer.

    python benchmarks/checkpoint_stall.py [--device auto] [--model reference|small] [--repeats 3] [--dir DIR]
        [--json OUT] [--quick]

The state is what train.py saves: the model (in the device's layout) and Adam's state after one step, plus the
step, RNG state and arguments (~0.4 GB for the reference model). ``sync`` is unet.checkpoint.save_checkpoint:
the loop waits for device-to-host copy, serialisation, write and fsync. ``background`` is
unet.training.background_save.BackgroundCheckpointer: the loop waits only for ``save()`` (the host snapshot; on CUDA
the copies are queued and it returns at once), then ``flush()`` waits for the write so the next repeat starts
clean. The first background save also allocates (pins, on CUDA) its host buffers and is reported apart.
Files are written under --dir (default: a temporary folder in the working directory, so the disk is the one a
run's --model-dir would use).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import MODELS, QUICK_MODEL, device_for, machine_header, machine_record, write_json  # noqa: E402

from unet.training.background_save import BackgroundCheckpointer  # noqa: E402
from unet.checkpoint import save_checkpoint  # noqa: E402
from unet.device import DEVICE_CHOICES  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--model", default="reference", choices=tuple(MODELS))
    p.add_argument("--repeats", type=int, default=3, help="saves per mode (medians reported)")
    p.add_argument("--dir", default=".", help="folder to write the checkpoints in (a temporary folder inside it)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke test: the small model at 64x64, 2 repeats")
    return p


def training_state(spec, dev) -> tuple[torch.nn.Module, dict]:
    """The model and the extra state train.py saves, after one Adam step (so its moments exist)."""
    torch.manual_seed(0)
    model = dev.prepare_model(spec.build())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=5e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    extra = {"step": 200, "optimizer": optimizer.state_dict(), "scaler": {}, "rng": dev.rng_state(),
             "args": {"batch_size": 8, "learning_rate": 1e-4, "fold": 0}}
    return model, extra


def time_sync(path: Path, model, extra: dict, repeats: int, dev) -> list[float]:
    times = []
    for _ in range(repeats):
        dev.synchronize()
        t0 = time.perf_counter()
        save_checkpoint(path, model, **extra)
        times.append(time.perf_counter() - t0)
    return times


def time_background(path: Path, model, extra: dict, repeats: int, dev) -> tuple[list[float], list[float]]:
    """(seconds save() blocked, seconds until the file was in place) per repeat."""
    blocked, total = [], []
    with BackgroundCheckpointer() as saver:
        for _ in range(repeats):
            dev.synchronize()
            t0 = time.perf_counter()
            saver.save(path, model, **extra)
            blocked.append(time.perf_counter() - t0)
            saver.flush()
            total.append(time.perf_counter() - t0)
    return blocked, total


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    if args.repeats < 2:
        raise SystemExit("--repeats must be >= 2 (the first background save allocates its buffers)")
    spec = QUICK_MODEL if args.quick else MODELS[args.model]
    dev = device_for(args.device, "fp32")
    print(machine_header("checkpoint stall", dev))
    model, extra = training_state(spec, dev)
    with tempfile.TemporaryDirectory(prefix="unet-ckpt-bench-", dir=args.dir) as tmp:
        sync = time_sync(Path(tmp) / "sync.pt", model, extra, args.repeats, dev)
        size_mb = (Path(tmp) / "sync.pt").stat().st_size / 2 ** 20
        blocked, total = time_background(Path(tmp) / "background.pt", model, extra, args.repeats, dev)
    row = {"model": spec.name, "parameters": sum(p.numel() for p in model.parameters()), "file_mb": size_mb,
           "sync_s": statistics.median(sync), "background_blocked_s": statistics.median(blocked[1:]),
           "background_first_blocked_s": blocked[0], "background_to_disk_s": statistics.median(total[1:]),
           "repeats": args.repeats, "sync_all_s": sync, "background_blocked_all_s": blocked,
           "background_to_disk_all_s": total}
    print(f"# {spec.name}: {row['parameters']:,} parameters + Adam state, {size_mb:.0f} MB on disk, "
          f"{args.repeats} saves per mode, medians (the background ones without the first)")
    print(f"{'mode':<12} {'loop blocked ms':>16} {'on disk after ms':>17}")
    print(f"{'sync':<12} {row['sync_s'] * 1e3:>16.0f} {row['sync_s'] * 1e3:>17.0f}")
    print(f"{'background':<12} {row['background_blocked_s'] * 1e3:>16.0f} {row['background_to_disk_s'] * 1e3:>17.0f}")
    print(f"# first background save (allocates the host buffers): blocked {blocked[0] * 1e3:.0f} ms; "
          f"loop stall (background / sync) {row['background_blocked_s'] / row['sync_s']:.2f}x the synchronous save's")
    write_json(args.json, {"benchmark": "checkpoint_stall", "machine": machine_record(dev), "rows": [row]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
