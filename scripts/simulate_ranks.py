"""Many ranks of a block-wise infer.py run, some SIGKILLed mid-run, then ``--resume``: is every block written once?

    python scripts/simulate_ranks.py --work /tmp/sim                       # 16 ranks, 4 killed, resume with 6
    python scripts/simulate_ranks.py --work /tmp/sim --ranks 64 --resume-ranks 24 --kill 16

It makes a small OME-Zarr volume (4 slices of 256 x 256, chunks and blocks of 32: 256 blocks), then runs the real
block-wise path twice in separate processes, each a rank of a real gloo process group:

1. ``--ranks`` processes, as ``torchrun --nproc_per_node=N infer.py ... --output masks.zarr --probabilities
   probs.zarr`` runs them, of which ``--kill`` are SIGKILLed once they have recorded ``--kill-after`` blocks:
   half by this launcher while they are inside the forward of their next block (such a rank waits there once it
   has recorded that many, so that the kill lands mid-block however busy the machine is: a block read, nothing
   written), the other half by themselves between a block's mask write and its probability write (a block
   half-written, never recorded).
   The survivors are left to finish their own blocks (torchrun's agent would stop them at once; letting them
   finish leaves the resume exactly the victims' blocks and the most records to honour) and then find their dead
   peers at the final collective: gloo fails them ("Connection closed by peer"); one still waiting there with
   all its blocks recorded would be stopped by the launcher.
2. ``--resume-ranks`` processes with ``resume`` set: the same command plus ``--resume``.

Why real process-group ranks and not processes with RANK / WORLD_SIZE set: which blocks a rank predicts is a
pure function of (rank, world size, done records), but the run is not: rank 0 alone creates the outputs and the
manifest and the others open them only after a barrier; rank 0 commits only after the last barrier; the block
count is summed by an all-reduce. Without a process group those barriers are no-ops (``unet.distributed``), so the
other ranks would race rank 0's creation and rank 0 would commit before they finished. The processes are forked
from a forkserver that imported torch once (a fresh interpreter per rank would spend seconds of CPU on the
imports alone, times 16 or 64).

What is real and what stands in: each rank calls :func:`unet.prediction.stacks.run_inference` (infer.py's own
call after loading the checkpoint) on the job :func:`unet.prediction.jobs.plan_jobs` plans, so the block grid,
the rank's share, the done records, the writers and the commit are infer.py's. Only the forward pass stands in,
through run_inference's ``forward`` argument (the seam ``torch.compile`` and OpenVINO use): a 'valid' 2-level UNet
gives the tile geometry, and :class:`StandIn` returns logits ``(0, 64 (x - 0.5))`` of each tile's centre (sleeping
``--delay`` s first, as a slow forward would, so that the ranks work side by side; the resume's does not sleep,
the stand-in's delay being no part of the run's identity). The expected outputs are then known exactly: mask 255
where the input is >= 128, cell probability ``sigmoid(64 (v / 255 - 0.5))``.

Each process appends one line per event to its own log (one ``write`` per event, O_APPEND: a SIGKILL leaves whole
lines): ``write masks|probs <block>`` before a write, ``mark <block>`` after a completion record. The checks:

* the outputs equal the stand-in's expected output (masks exactly, probabilities within 1e-6), and no
  ``.partial`` or records folder is left;
* every block has exactly one completion record: those on disk after the kills plus those the resume made,
  never both, none missing; a record is made only after both of its block's writes;
* every block is written exactly once over both runs, except blocks in flight when their rank was killed (written,
  at least in part, never recorded): those are written again by the resume, at most one per killed rank.

It prints a summary (blocks, ranks, killed, recorded before the resume, redone, written exactly once: yes/no)
and exits 1 on any violation.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from unet.device import DeviceOptions, prediction_device  # noqa: E402
from unet.distributed import env_info, process_group  # noqa: E402
from unet.io.volume_writers import VolumeWriter, create_volume  # noqa: E402
from unet.io.volumes import VolumeOptions, open_volume  # noqa: E402
from unet.model import UNet  # noqa: E402
from unet.prediction.block_records import DONE, BlockRecords  # noqa: E402
from unet.prediction.jobs import plan_jobs  # noqa: E402
from unet.prediction.pipeline import StackPredictor  # noqa: E402
from unet.prediction.stacks import InferOptions, block_settings, run_inference  # noqa: E402
from unet.prediction.tiling import TilingOptions  # noqa: E402
from unet.prediction.volume_jobs import job_grid  # noqa: E402

TILE = 48  # the stand-in UNet's (2 levels, 'valid') input tile: 32 x 32 of output, one chunk
IDENTITY = {"checkpoints": ["stand-in"], "precision": "fp32"}  # in the manifest, as a checkpoint's hash would be


@dataclass(frozen=True)
class Config:
    """One simulation's settings, shared by the launcher and every rank."""

    work: Path
    block: int
    delay: float
    kill_after: int
    timeout: float


class StandIn:
    """The forward pass of a 'valid' model without a network: logits ``(0, 64 (x - 0.5))`` of each tile's centre.

    Args:
        model: the UNet whose geometry (output size) the tiles follow.
        delay: seconds to sleep per call (a slow forward, so that the ranks are still at work when the kills come).
        hold: when it returns True, the call waits ``hold_s`` instead: a rank the launcher is about to kill stays
            inside a forward, so that the kill lands mid-block however busy the machine is.
        hold_s: how long to hold (the launcher's timeout: a rank still held then counts as hung).
    """

    def __init__(self, model: UNet, delay: float, hold=lambda: False, hold_s: float = 0.0):
        self.model, self.delay, self.hold, self.hold_s = model, delay, hold, hold_s

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        time.sleep(self.hold_s if self.hold() else self.delay)
        size = tiles.shape[-1]
        m = (size - self.model.output_size(size)) // 2
        logit = (tiles[:, :1, m:size - m, m:size - m].float() - 0.5) * 64
        return torch.cat([torch.zeros_like(logit), logit], 1)


def expected_outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The masks and cell probabilities the stand-in gives for uint8 ``images`` (as infer.py scales and softmaxes)."""
    logit = (torch.from_numpy(images).float() / 255 - 0.5) * 64
    probs = torch.stack([torch.zeros_like(logit), logit], 1).softmax(1)[:, 1].numpy()
    return np.where(images >= 128, 255, 0).astype(np.uint8), probs


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``scripts/simulate_ranks.py``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="an empty or new folder for the volume, outputs and logs")
    p.add_argument("--ranks", type=int, default=16, help="processes of the first run (1..64)")
    p.add_argument("--resume-ranks", type=int, default=6, help="processes of the --resume run (1..64)")
    p.add_argument("--kill", type=int, default=4, help="ranks of the first run SIGKILLed mid-run (1..--ranks)")
    p.add_argument("--kill-after", type=int, default=2, help="blocks a rank records before it is killed")
    p.add_argument("--slices", type=int, default=4, help="slices of the volume")
    p.add_argument("--size", type=int, default=256, help="slice height and width")
    p.add_argument("--block", type=int, default=32, help="--chunks and --block-size (a multiple of 32)")
    p.add_argument("--delay", type=float, default=0.05, help="seconds the stand-in forward sleeps per tile")
    p.add_argument("--timeout", type=float, default=300, help="seconds a run may take before it counts as hung")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input volume")
    return p


# ---------------------------------------------------------------------------------------------------- one rank

def _log_events(path: Path):
    """A logger of one process's events: each line one ``os.write`` to an O_APPEND file, whole even under SIGKILL."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    return lambda *words: os.write(fd, (" ".join(map(str, words)) + "\n").encode())


def _instrument(log, index_of: dict, self_kill_after: int | None) -> list[int]:
    """Log this process's block writes and completion records (the simulation's own patch, in its own process);
    with ``self_kill_after``, SIGKILL this process between a block's two writes once that many blocks are recorded.
    Returns the list of blocks this process records, kept up to date."""
    real_write, real_mark = VolumeWriter.write, BlockRecords.mark
    recorded = []

    def write(self, start, block):
        kind = self.path.container.name.split(".")[0]
        log("write", kind, index_of[tuple(start)])
        if kind == "probs" and self_kill_after is not None and len(recorded) >= self_kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # this block's mask is written, its probabilities never will be
        return real_write(self, start, block)

    def mark(self, index, stage=DONE, data=None):
        real_mark(self, index, stage, data)
        if stage == DONE:
            recorded.append(index)
            log("mark", index)

    VolumeWriter.write, BlockRecords.mark = write, mark
    return recorded


def _rank_main(rank: int, world: int, run: int, port: int, config: Config, fate: str) -> None:
    """One rank: the block-wise part of ``infer.py`` (after the checkpoint load) with the stand-in forward;
    ``fate`` is ``"live"``, ``"self"`` (kills itself between two writes) or ``"launcher"`` (held in a forward once
    it has recorded ``kill_after`` blocks, until the launcher kills it)."""
    logs = config.work / "logs"
    err = os.open(logs / f"run{run}-rank{rank}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(err, 1), os.dup2(err, 2)  # gloo's complaints about dead peers go to a file, not the console
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist = env_info()
    settings = InferOptions(input=str(config.work / "em.ome.zarr"), output=str(config.work / "masks.zarr"),
                            probabilities=str(config.work / "probs.zarr"), chunks=(config.block, config.block),
                            block_size=(config.block, config.block), resume=run == 2, no_progress=True,
                            tile_plan="flops")
    jobs = plan_jobs(settings.input, settings.output, probabilities=settings.probabilities, volume=VolumeOptions(),
                     resume=settings.resume, processes=world)
    dev = prediction_device(DeviceOptions(device="cpu"), "fp32", dist.local_rank)
    model = dev.prepare_model(UNet(base_filters=2, depth=2, padding="valid").eval())  # geometry only
    options = TilingOptions(tile_size=TILE, tile_batch=1, memory_budget_mb=1024)
    grid, _ = job_grid(jobs[0], StackPredictor(model, dev, options), block_settings(settings))
    recorded = _instrument(_log_events(logs / f"run{run}-rank{rank}.log"),
                           {(b.z, b.y.start, b.x.start): b.index for b in grid},
                           config.kill_after if fate == "self" else None)
    stand_in = StandIn(model, config.delay, lambda: fate == "launcher" and len(recorded) >= config.kill_after,
                       config.timeout)
    with process_group(dist, dev.backend, dev.device):
        run_inference(model, dev, jobs, settings, options=options, forward=stand_in, identity=IDENTITY, dist=dist)


# ---------------------------------------------------------------------------------------------------- launcher

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _victims(world: int, kill: int) -> list[int]:
    """``kill`` ranks spread over ``world``, rank 0 (the one that creates and commits) first."""
    return sorted({round(i * world / kill) for i in range(kill)})


def _launch(ctx, world: int, run: int, config: Config, fates: dict[int, str]) -> list:
    """Start ``world`` ranks of one run (``fates``: the ranks that are to die, see :func:`_rank_main`)."""
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, run, port, config, fates.get(r, "live")), name=f"rank{r}")
             for r in range(world)]
    for p in procs:
        p.start()
    return procs


def _supervise(procs: list, config: Config, kill_now: set[int], timeout: float) -> dict[int, str]:
    """Wait for the ranks, SIGKILLing those in ``kill_now`` once they recorded ``kill_after`` blocks, and stopping a
    rank that waits at a collective for dead peers with all its blocks recorded. Returns each rank's fate."""
    world, records = len(procs), BlockRecords(config.work / "masks.zarr")
    share = {r: set(range(r, _num_blocks(config), world)) for r in range(world)}
    fates, deadline, stuck_since = {}, time.monotonic() + timeout, {}
    while len(fates) < world:
        done = records.done()
        for r, p in enumerate(procs):
            if r in fates or p.exitcode is not None:
                fates.setdefault(r, "SIGKILL" if p.exitcode == -signal.SIGKILL else f"exit {p.exitcode}")
            elif r in kill_now and len(done & share[r]) >= config.kill_after:
                os.kill(p.pid, signal.SIGKILL)
                p.join()
                fates[r] = "SIGKILL (launcher)"
            elif share[r] <= done and _peer_died(fates) and _waited(stuck_since, r, 2.0):
                os.kill(p.pid, signal.SIGKILL)  # all its blocks recorded, peers dead: torchrun's agent would stop it
                p.join()
                fates[r] = "stopped after its blocks"
            elif time.monotonic() > deadline:
                p.kill()
                p.join()
                fates[r] = "hung"
        time.sleep(0.01)
    return fates


def _peer_died(fates: dict[int, str]) -> bool:
    return any(f != "exit 0" for f in fates.values())


def _waited(since: dict[int, float], rank: int, seconds: float) -> bool:
    """Whether ``rank`` has been found waiting for ``seconds`` (the first call starts its clock)."""
    return since.setdefault(rank, time.monotonic()) < time.monotonic() - seconds


def _num_blocks(config: Config) -> int:
    with open_volume(str(config.work / "em.ome.zarr")) as vol:
        z, h, w = vol.shape
    return z * -(-h // config.block) * -(-w // config.block)


def _make_input(work: Path, slices: int, size: int, block: int, seed: int) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, (slices, size, size), dtype=np.uint8)
    writer = create_volume(str(work / "em.ome.zarr"), images.shape, np.uint8, (1, block, block))
    writer.write((0, 0, 0), images)
    writer.commit()
    return images


# ------------------------------------------------------------------------------------------------------ checks

def _events(work: Path, run: int, world: int) -> dict[int, list[tuple[str, ...]]]:
    """Each rank's logged events of one run, as word tuples."""
    path = work / "logs"
    return {r: [tuple(line.split()) for line in (path / f"run{run}-rank{r}.log").read_text().splitlines()]
            if (path / f"run{run}-rank{r}.log").exists() else [] for r in range(world)}


def _writes(events: dict) -> Counter:
    """Mask writes per block (each block writes its mask first, then its probabilities)."""
    return Counter(int(e[2]) for evs in events.values() for e in evs if e[:2] == ("write", "masks"))


def _marks(events: dict) -> list[int]:
    return [int(e[1]) for evs in events.values() for e in evs if e[0] == "mark"]


def _records_after_writes(events: dict) -> bool:
    """Whether every ``mark b`` of a process follows its ``write masks b`` and ``write probs b``."""
    for evs in events.values():
        written = set()
        for e in evs:
            if e[0] == "write":
                written.add((e[1], int(e[2])))
            elif not {("masks", int(e[1])), ("probs", int(e[1]))} <= written:
                return False
    return True


def _check_records(before: set[int], first: dict, second: dict, blocks: int) -> list[str]:
    """Violations of 'exactly one completion record per block' (``before``: the records on disk after the kills)."""
    problems, again = [], _marks(second)
    if not set(_marks(first)) <= before:
        problems.append(f"logged records missing on disk: {sorted(set(_marks(first)) - before)}")
    if before & set(again) or len(again) != len(set(again)):
        problems.append(f"blocks recorded twice: {sorted(before & set(again))}")
    if before | set(again) != set(range(blocks)):
        problems.append(f"blocks never recorded: {sorted(set(range(blocks)) - before - set(again))}")
    if not (_records_after_writes(first) and _records_after_writes(second)):
        problems.append("a block was recorded before both of its writes")
    return problems


def _check_writes(before: set[int], first: dict, second: dict, blocks: int,
                  victims: list[int]) -> tuple[list[str], set]:
    """Violations of 'written exactly once but for the blocks in flight at a kill' (at most one per killed rank:
    one tile per forward keeps one block open); returns them and the blocks written by both runs."""
    w1, w2 = _writes(first), _writes(second)
    redone = set(w1) & set(w2)
    problems = []
    twice = sorted(b for b in range(blocks) if w1[b] > 1 or w2[b] > 1)
    if twice:
        problems.append(f"blocks written twice within one run: {twice}")
    if set(w2) & before:
        problems.append(f"recorded blocks written again by the resume: {sorted(set(w2) & before)}")
    if any(b % len(first) not in victims for b in redone) or len(redone) > len(victims):
        problems.append(f"blocks written by both runs {sorted(redone)} are not one in flight per killed rank")
    if set(w1) | set(w2) != set(range(blocks)):
        problems.append(f"blocks never written: {sorted(set(range(blocks)) - set(w1) - set(w2))}")
    return problems, redone


def _check_outputs(work: Path, images: np.ndarray) -> tuple[list[str], float]:
    """Violations in the committed outputs; returns them and the largest probability difference."""
    masks, probs = expected_outputs(images)
    leftovers = sorted(p.name for p in work.iterdir() if p.name.endswith((".partial", ".unet_blocks")))
    if leftovers:
        return [f"left behind: {leftovers}"], float("nan")
    with open_volume(str(work / "masks.zarr")) as m, open_volume(str(work / "probs.zarr")) as p:
        got_masks, got_probs = m.read(), p.read()
    problems = [] if np.array_equal(got_masks, masks) else [f"{int((got_masks != masks).sum())} mask pixels differ"]
    diff = float(np.abs(got_probs - probs).max())
    return problems + ([f"probabilities differ by {diff:.3g}"] if diff > 1e-6 else []), diff


def _per_rank(events: dict) -> list[int]:
    """Blocks each rank wrote (mask writes) in one run."""
    return [sum(e[:2] == ("write", "masks") for e in events[r]) for r in sorted(events)]


# --------------------------------------------------------------------------------------------------------- main

def _check_args(args: argparse.Namespace) -> None:
    if not (1 <= args.ranks <= 64 and 1 <= args.resume_ranks <= 64 and 1 <= args.kill <= args.ranks):
        raise SystemExit("simulate_ranks.py: error: --ranks and --resume-ranks must be in 1..64, --kill in 1..--ranks")
    if args.block % 32 or args.size % args.block:
        raise SystemExit("simulate_ranks.py: error: --block must be a multiple of 32 dividing --size")
    blocks = args.slices * (args.size // args.block) ** 2
    if blocks < args.ranks * (args.kill_after + 1):
        raise SystemExit(f"simulate_ranks.py: error: {blocks} blocks leave a rank fewer than --kill-after + 1")
    if args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(f"simulate_ranks.py: error: --work {args.work} is not empty")


def _runs(args: argparse.Namespace, config: Config) -> tuple[dict, dict, set[int], list[int], list[float]]:
    """Run 1 with kills, then the resume; returns both runs' fates, the records after run 1, the victims and the
    runs' wall-clock seconds."""
    ctx = mp.get_context("forkserver")
    # A SIGKILLed rank never releases its multiprocessing locks (tqdm's, numcodecs'); the resource tracker removes
    # them and warns of "leaked semaphore objects", which is expected here. Its interpreter takes our -W options.
    sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")
    # torch, zarr and unet imported once, in the forkserver (Python 3.11 ignores "__main__" in this list; the
    # children still run this script's top, but its imports are then already loaded).
    ctx.set_forkserver_preload(["torch", "zarr", "unet.prediction.stacks", "unet.device", "unet.model"])
    victims = _victims(args.ranks, args.kill)
    # Every other victim kills itself between a block's two writes, the others are killed by the launcher.
    fates = {r: "launcher" if k % 2 == 0 else "self" for k, r in enumerate(victims)}
    start = time.monotonic()
    first = _supervise(_launch(ctx, args.ranks, 1, config, fates), config, set(victims[::2]), args.timeout)
    before = BlockRecords(config.work / "masks.zarr").done()
    middle = time.monotonic()
    resume = Config(config.work, config.block, 0.0, config.kill_after, args.timeout)  # no kills: no need to wait
    second = _supervise(_launch(ctx, args.resume_ranks, 2, resume, {}), resume, set(), args.timeout)
    return first, second, before, victims, [middle - start, time.monotonic() - middle]


def main(args: argparse.Namespace) -> dict:
    """Run the simulation and check it (see the module docstring).

    Args:
        args: from :func:`get_args_parser`.

    Returns:
        The summary: ``blocks``, ``ranks``, ``resume_ranks``, ``killed`` (ranks), ``recorded_before_resume``,
        ``redone`` (blocks written in both runs), ``written_per_rank`` (per run), ``max_probability_difference``,
        ``problems`` (violations, empty when all holds), ``fates`` (per run and rank) and ``seconds`` (per run).
    """
    _check_args(args)
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    config = Config(args.work.resolve(), args.block, args.delay, args.kill_after, args.timeout)
    images = _make_input(config.work, args.slices, args.size, args.block, args.seed)
    blocks = _num_blocks(config)
    fates1, fates2, before, victims, seconds = _runs(args, config)
    first, second = _events(config.work, 1, args.ranks), _events(config.work, 2, args.resume_ranks)
    problems = [f"run 1 rank {r} was killed but ended: {fates1[r]}" for r in victims if "SIGKILL" not in fates1[r]]
    problems += [f"resume rank {r} ended: {f}" for r, f in fates2.items() if f != "exit 0"]
    problems += [f"run 1 rank {r} hung" for r, f in fates1.items() if f == "hung"]
    problems += _check_records(before, first, second, blocks)
    write_problems, redone = _check_writes(before, first, second, blocks, victims)
    resumed = all(f == "exit 0" for f in fates2.values())
    output_problems, diff = _check_outputs(config.work, images) if resumed else (["outputs not checked"], float("nan"))
    return {"blocks": blocks, "ranks": args.ranks, "resume_ranks": args.resume_ranks, "killed": victims,
            "recorded_before_resume": len(before), "redone": sorted(redone),
            "written_per_rank": {1: _per_rank(first), 2: _per_rank(second)}, "max_probability_difference": diff,
            "problems": problems + write_problems + output_problems, "fates": {1: fates1, 2: fates2},
            "seconds": seconds}


def report(summary: dict) -> str:
    """The summary as the lines the script prints."""
    ok = "no" if summary["problems"] else "yes"
    lines = [f"blocks: {summary['blocks']}; ranks: {summary['ranks']}, then {summary['resume_ranks']} for --resume",
             f"killed: {len(summary['killed'])} (ranks {', '.join(map(str, summary['killed']))}; every other one "
             f"by the launcher inside a forward, the others by themselves between a block's two writes)",
             f"recorded before the resume: {summary['recorded_before_resume']}",
             f"redone: {len(summary['redone'])} (blocks in flight at a kill: {summary['redone']})",
             f"blocks written per rank, run 1: {summary['written_per_rank'][1]}",
             f"blocks written per rank, resume: {summary['written_per_rank'][2]}",
             f"run 1 fates: {dict(Counter(summary['fates'][1].values()))}",
             f"wall-clock: run 1 {summary['seconds'][0]:.1f} s, resume {summary['seconds'][1]:.1f} s",
             f"outputs: largest probability difference {summary['max_probability_difference']:.2g} (masks compared "
             f"exactly)",
             f"written exactly once: {ok}"]
    return "\n".join(lines + [f"violation: {p}" for p in summary["problems"]])


if __name__ == "__main__":
    result = main(get_args_parser().parse_args())
    print(report(result))
    sys.exit(1 if result["problems"] else 0)
