"""Block-wise inference of large chunked volumes: throughput, memory, processes and a kill, each row a real run.

    python benchmarks/large_volume.py --work /tmp/lv [--slices 16 --size 8192] [--big 16384]
        [--parts throughput,memory,ranks,kill] [--model small|reference] [--block-io auto[,inline]]
        [--yardstick-s 20] [--json OUT] [--quick]

The volume is synthetic EM (:func:`unet.data.synthetic.make_synthetic_em`: cells, membranes, organelles, one
2048x2048 slice tiled with flips so that large slices cost seconds to make), written chunk by chunk as OME-Zarr
and as HDF5 by the project's own writer. The model is the issue's small one (base 8, 'same', random weights,
seed 0), or with ``--model reference`` NVIDIA's (a GPU's realistic load); tiles are pinned
(``--tile-size``/``--tile-batch``) so that every row and the yardstick run the same tiles.

throughput: ``infer.py`` on the --slices x --size^2 volume (OME-Zarr in and out with each ``--block-io``, then
    HDF5 in and out), against forward-only: the same number of forwards of the same tile batch through infer.py's own tile predictor
    (layout, autocast, softmax), on random tiles in memory. ratio = forward-only seconds / infer.py's seconds.
memory: one --size^2 slice and one --big^2 slice (4x the pixels at the defaults): peak RSS of each run.
ranks: ``torchrun --nproc_per_node 1`` and ``2`` on the OME-Zarr volume (each rank gets cores / ranks threads).
kill: the OME-Zarr run killed (SIGKILL) half a block after half its blocks are recorded complete, then the same
    command with ``--resume``: blocks recorded before the kill, the work in flight at the kill (lost), blocks the
    resume predicted, and the wall seconds against the uninterrupted run of the throughput part.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import REPO, csv_list, machine_header, write_json  # noqa: E402
from infer_defaults import WRAPPER, checkpoint  # noqa: E402

from unet.data.synthetic import make_synthetic_em  # noqa: E402
from unet.device import DeviceOptions, PrecisionOptions, prediction_device, usable_cpus  # noqa: E402
from unet.host_memory import keep_freed_memory  # noqa: E402
from unet.io.volume_writers import create_volume  # noqa: E402
from unet.io.volumes import open_volume  # noqa: E402
from unet.model import UNet  # noqa: E402
from unet.prediction.block_records import records_path  # noqa: E402
from unet.prediction.blocks import block_grid, block_shape_for  # noqa: E402
from unet.prediction.predictor import tile_predictor  # noqa: E402
from unet.prediction.tiling import TilingOptions  # noqa: E402

# small: the model (base 8, 'same'); reference: NVIDIA's (base 64, 'valid'), a GPU's realistic load.
MODELS = {"small": {"base_filters": 8, "padding": "same"}, "reference": {}}
BASE_TILE = 2048  # the synthetic slice every large slice is tiled from


def make_volume(spec: str, slices: int, size: int, chunks: int) -> None:
    """A ``slices x size x size`` uint8 EM-like volume at ``spec`` (OME-Zarr or HDF5), written one chunk row at a time."""
    base = make_synthetic_em(1, BASE_TILE, BASE_TILE, seed=0)[0][0]
    variants = [base, base[::-1], base[:, ::-1], base[::-1, ::-1]]
    with create_volume(spec, (slices, size, size), np.uint8, (1, chunks, chunks), overwrite=True) as out:
        for z in range(slices):
            for y in range(0, size, BASE_TILE):
                row = np.concatenate([variants[(z + y // BASE_TILE + x // BASE_TILE) % 4]
                                      for x in range(0, size, BASE_TILE)], axis=1)[:, :size]
                out.write((z, y, 0), row[None, :min(BASE_TILE, size - y)])
        out.commit()


def same_volume(path: Path, shape: tuple[int, int, int]) -> bool:
    """Whether ``path`` holds a committed volume of ``shape`` (an earlier run's, for --reuse-volumes)."""
    try:
        with open_volume(str(path)) as vol:
            return tuple(vol.shape) == shape
    except Exception:  # noqa: BLE001 - missing, partial or unreadable: made again
        return False


def infer_command(ckpt: Path, src: str, dst: str, args, *extra: str, block_io: str = "auto") -> list[str]:
    return ["--ckpt", str(ckpt), "--input", src, "--output", dst, "--tile-size", str(args.tile[0]),
            "--tile-batch", str(args.tile[1]), "--block-size", str(args.block), "--chunks", str(args.chunks),
            "--block-io", block_io, "--no-progress", *extra]


def parse_run(out: str) -> dict:
    """infer.py's own figures from its output: streaming seconds, slices, blocks, peak RSS (rank 0's)."""
    done = re.search(r"done: (\d+) slices in ([\d.]+) s", out)
    blocks = re.search(r"blocks: (\d+) of (\d+) predicted", out)
    rss = [int(v) for v in re.findall(r"peak_rss_kib (\d+)", out)]
    return {"stream_s": float(done.group(2)) if done else None, "slices": int(done.group(1)) if done else None,
            "blocks_predicted": int(blocks.group(1)) if blocks else None,
            "blocks": int(blocks.group(2)) if blocks else None,
            "peak_rss_mb": max(rss) / 1024 if rss else None}


def run_infer(args: list[str], nproc: int = 0, env: dict | None = None) -> dict:
    """One infer.py run (``nproc`` > 0: under torchrun), its figures and wall seconds; a failure exits."""
    script = ["-c", WRAPPER % str(REPO / "infer.py")]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--no-python", sys.executable, *script, *args]
    else:
        cmd = [sys.executable, *script, *args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"infer.py {' '.join(args)} failed: {(done.stdout + done.stderr).strip()[-800:]}")
    return {"wall_s": wall, **parse_run(done.stdout + done.stderr)}


def forward_only_timer(args) -> tuple[Callable[[], float], int]:
    """A timer of the forwards the block-wise run makes on the ``slices x size^2`` volume, and their number.

    The model and tiles are built once; each call of the timer times at least ``--yardstick-s`` of forwards and
    returns the seconds all the forwards would take: a few forwards on a shared (virtual) host vary by more than
    the 10 % the ratio is judged by."""
    slices, size, tile = args.slices, args.size, args.tile
    dev = prediction_device(DeviceOptions(), PrecisionOptions().precision)  # infer.py's default device and precision
    if dev.type == "cpu":
        # infer.py's default --host-allocator: its forwards reuse freed memory; without it here, every forward
        # page-faults its activations in again (22-25 ms against 32-33 ms per 512^2 forward on a 2-core Xeon).
        keep_freed_memory()
    torch.manual_seed(0)
    model = UNet(**MODELS[args.model]).eval()
    model = dev.prepare_model(model)
    options = TilingOptions(tile_size=tile[0], tile_batch=tile[1])
    hw = (size, size)
    grid = block_grid((slices, *hw), block_shape_for((args.chunks, args.chunks), (args.block, args.block), hw),
                      model, options)
    forwards = -(-sum(b.num_tiles for b in grid) // tile[1])  # blocks share batches: only the last one is short
    predictor = tile_predictor(model, dev)
    batch = torch.rand(tile[1], 1, tile[0], tile[0], device=dev.device)

    def seconds() -> float:
        with torch.inference_mode():
            predictor(batch)  # warm-up: oneDNN picks its kernels
            done, t0 = 0, time.perf_counter()
            while done < forwards and time.perf_counter() - t0 < args.yardstick_s:
                predictor(batch)
                done += 1
            dev.synchronize()
        return forwards * (time.perf_counter() - t0) / done

    return seconds, forwards


def throughput_part(work: Path, ckpt: Path, args) -> list[dict]:
    rows = []
    gpx = args.slices * args.size ** 2 / 1e9
    forward_only_s, forwards = forward_only_timer(args)
    runs = [("OME-Zarr", "vol.ome.zarr", "pred.ome.zarr", mode) for mode in args.block_io]
    runs.append(("HDF5", "vol.h5/raw", "pred.h5/masks", args.block_io[0]))
    for fmt, src, dst, mode in runs:
        # The yardstick is timed right before and right after the run, and averaged, so that a drift of the
        # host's speed during the run hits both sides alike.
        before = forward_only_s()
        r = run_infer(infer_command(ckpt, str(work / src), str(work / dst), args, "--overwrite", block_io=mode))
        after = forward_only_s()
        fwd_s = (before + after) / 2
        r.update(part="throughput", format=fmt, block_io=mode, gpx=gpx, forward_only_s=fwd_s, forwards=forwards,
                 forward_only_before_after_s=[before, after], ratio=fwd_s / r["stream_s"],
                 mpx_per_s=gpx * 1e3 / r["stream_s"])
        rows.append(r)
        print(f"  {fmt:8} --block-io {mode:7} {args.slices} x {args.size}^2 ({gpx:.2f} Gpx): infer.py {r['stream_s']:7.1f} s "
              f"({r['mpx_per_s']:.2f} Mpx/s, {r['blocks']} blocks)  forward-only {fwd_s:7.1f} s ({forwards} "
              f"forwards; {before:.1f} s before, {after:.1f} s after)  ratio {r['ratio']:.3f}  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def memory_part(work: Path, ckpt: Path, args) -> list[dict]:
    rows = []
    for size in (args.size, args.big):
        src = work / f"slice{size}.ome.zarr"
        make_volume(str(src), 1, size, args.chunks)
        r = run_infer(infer_command(ckpt, str(src), str(work / "m.ome.zarr"), args, "--overwrite"))
        r.update(part="memory", size=size)
        rows.append(r)
        print(f"  one {size}^2 slice: infer.py {r['stream_s']:7.1f} s  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    print(f"  peak RSS {rows[1]['size']}^2 / {rows[0]['size']}^2 = {rows[1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f}"
          f" for {rows[1]['size'] ** 2 / rows[0]['size'] ** 2:.0f}x the pixels")
    return rows


def ranks_part(work: Path, ckpt: Path, args) -> list[dict]:
    rows = []
    for nproc in (1, 2):
        threads = max(1, usable_cpus() // nproc)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        r = run_infer(infer_command(ckpt, str(work / "vol.ome.zarr"), str(work / "ranks.ome.zarr"), args,
                                    "--overwrite"), nproc=nproc, env=env)
        r.update(part="ranks", nproc=nproc, threads_per_rank=threads,
                 mpx_per_s=args.slices * args.size ** 2 / 1e6 / r["stream_s"])
        rows.append(r)
        print(f"  torchrun {nproc} process(es) x {threads} thread(s): {r['stream_s']:7.1f} s = "
              f"{r['mpx_per_s']:.2f} Mpx/s ({r['mpx_per_s'] / nproc:.2f} per rank)  wall {r['wall_s']:.1f} s", flush=True)
    return rows


def kill_part(work: Path, ckpt: Path, args, uninterrupted_s: float | None) -> dict:
    """Kill the run half a block after half its blocks are recorded, then resume it; what was redone.

    Killing mid-block (not right after a record) is the fair case: the block in flight is lost. Its work is the
    time from the newest record to the kill; the resume must predict exactly the blocks not recorded."""
    dst = work / "killed.ome.zarr"
    cmd = [sys.executable, "-c", WRAPPER % str(REPO / "infer.py"),
           *infer_command(ckpt, str(work / "vol.ome.zarr"), str(dst), args, "--overwrite")]
    done_dir = records_path(dst) / "done"
    total = args.slices * math.ceil(args.size / args.block) ** 2
    per_block = uninterrupted_s / total if uninterrupted_s else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and (len(os.listdir(done_dir)) if done_dir.is_dir() else 0) < total // 2:
        time.sleep(0.05)
    time.sleep(per_block / 2 if per_block else 0)
    if proc.poll() is not None:
        raise SystemExit(f"kill: infer.py ended (exit {proc.returncode}) before half of its {total} blocks were "
                         f"recorded; use a larger volume (--slices, --size) or smaller --block")
    proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    proc.wait()
    killed_after = time.perf_counter() - t0
    records = [done_dir / name for name in os.listdir(done_dir)]
    in_flight_s = killed_at - max(p.stat().st_mtime for p in records)
    r = run_infer(infer_command(ckpt, str(work / "vol.ome.zarr"), str(dst), args, "--resume"))
    lost = killed_after + r["wall_s"] - uninterrupted_s if uninterrupted_s else None
    row = {"part": "kill", "blocks": total, "recorded_at_kill": len(records),
           "resume_predicted": r["blocks_predicted"], "killed_after_s": killed_after, "in_flight_s": in_flight_s,
           "resume_wall_s": r["wall_s"], "lost_s": lost,
           "in_flight_blocks": in_flight_s / per_block if per_block else None,
           "lost_blocks": lost / per_block if lost is not None else None}
    print(f"  SIGKILL after {killed_after:.1f} s with {len(records)} of {total} blocks recorded, {in_flight_s:.1f} s "
          f"after the newest record"
          + (f" (= {row['in_flight_blocks']:.2f} block-times of work lost)" if per_block else "")
          + f"; --resume predicted {r['blocks_predicted']} (= {total} - {len(records)}: "
          f"{r['blocks_predicted'] == total - len(records)})"
          + (f"; kill + resume wall against the uninterrupted run (start-up included, host noise too): "
             f"{lost:+.1f} s = {row['lost_blocks']:+.2f} block-times" if lost is not None else ""), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path, help="folder for the volumes (several GB; kept for reruns)")
    p.add_argument("--slices", type=int, default=16)
    p.add_argument("--size", type=int, default=8192, help="slice side of the volume (and the memory part's small slice)")
    p.add_argument("--big", type=int, default=16384, help="the memory part's large slice side")
    p.add_argument("--tile", type=lambda s: tuple(csv_list(s, int)), default=(512, 1), metavar="SIZE,BATCH")
    p.add_argument("--block", type=int, default=4096, help="infer.py --block-size")
    p.add_argument("--chunks", type=int, default=1024, help="chunk side of the volumes and outputs")
    p.add_argument("--parts", type=csv_list, default=["throughput", "memory", "ranks", "kill"])
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--block-io", type=csv_list, default=["auto"], metavar="MODE[,MODE]",
                   help="infer.py --block-io of the OME-Zarr throughput rows (the first one: HDF5's and the rest)")
    p.add_argument("--yardstick-s", type=float, default=20.0,
                   help="seconds of forwards timed before and after each throughput row (at least)")
    p.add_argument("--reuse-volumes", action="store_true",
                   help="keep the --work volumes of an earlier run when their shape is this run's")
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 x 512^2 and a 1024^2 slice, blocks 256, "
                                                        "chunks 128, tiles 128; no kill")
    args = p.parse_args(argv)
    if args.quick:
        args.slices, args.size, args.big, args.block, args.chunks, args.tile = 2, 512, 1024, 256, 128, (128, 1)
        args.parts = [part for part in args.parts if part != "kill"]
    print(machine_header("large volumes, block-wise", prediction_device(DeviceOptions(), "auto")))
    print(f"# model {args.model} {MODELS[args.model]} (random, seed 0); tiles {args.tile[0]}, {args.tile[1]} per forward; blocks "
          f"{args.block}, chunks {args.chunks}; precision: infer.py's default", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(args.work, args.model, **MODELS[args.model])
    if {"throughput", "ranks", "kill"} & set(args.parts):
        for name in ("vol.ome.zarr", "vol.h5/raw"):
            if args.reuse_volumes and same_volume(args.work / name, (args.slices, args.size, args.size)):
                print(f"  reused {name}", flush=True)
                continue
            t0 = time.perf_counter()
            make_volume(str(args.work / name), args.slices, args.size, args.chunks)
            print(f"  made {name}: {args.slices} x {args.size}^2 uint8 in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    if "throughput" in args.parts:
        rows += throughput_part(args.work, ckpt, args)
    if "memory" in args.parts:
        rows += memory_part(args.work, ckpt, args)
    if "ranks" in args.parts:
        rows += ranks_part(args.work, ckpt, args)
    if "kill" in args.parts:
        zarr_row = next((r for r in rows if r.get("format") == "OME-Zarr" and r["block_io"] == "auto"), None)
        rows.append(kill_part(args.work, ckpt, args, zarr_row["wall_s"] if zarr_row else None))
    write_json(args.json, {"benchmark": "large_volume", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
