"""Every command's flag names survive the house move (issue 19): ``--help`` of each command lists the flags it
listed before (tests/cli_flags_before.json, recorded from the parsers before the move), apart from the changes made on
purpose, which are listed here with their reason."""
import json
import re
from pathlib import Path

import pytest

from unet.cli import commands

REPO = Path(__file__).resolve().parents[1]
BEFORE = json.loads((REPO / "tests" / "cli_flags_before.json").read_text())
# command -> (flags added on purpose, flags removed on purpose); each with its reason in a comment.
CHANGED: dict[str, tuple[set[str], set[str]]] = {
    # Issue 21: own data (--train-images/--train-labels, --val-images/--val-labels: TIFF stacks, folders or
    # chunked volumes) and a contiguous held-out z-range (--val-slices); label kinds, K and the ignore value
    # (LabelOptions); fine-tuning (--init-from, --freeze-encoder-steps); TensorBoard event files
    # (--tensorboard / --no-tensorboard, default on when the package is installed).
    "train": ({"--train-images", "--train-labels", "--val-images", "--val-labels", "--val-slices", "--label-kind",
               "--num-classes", "--ignore-label", "--init-from", "--freeze-encoder-steps", "--tensorboard",
               "--no-tensorboard",
               # Issue 22 item 1: the training layout, measured on the CPU by default (unet.training.layout).
               "--memory-format", "--memory_format",
               # Issue 22 item 1: glibc keeps freed host memory for the next step on the CPU (unet.host_memory).
               "--host-allocator", "--host_allocator",
               # Issue 21 item 1: the OME-Zarr level, channel and time point of chunked training volumes
               # (VolumeOptions, as infer.py's).
               "--scale", "--channel", "--time"}, set()),
    # Issue 22 item 2: --precision auto|fp32|bf16|fp16 (auto = bf16 where the chip computes it natively).
    # Issue 21: evaluate.py takes DataOptions, so the own-data and z-range flags override the checkpoint's.
    # Issue 21: --scale/--channel/--time (VolumeOptions) override the checkpoint's choices within own volumes.
    "evaluate": ({"--precision", "--train-images", "--train-labels", "--val-images", "--val-labels",
                  "--val-slices", "--scale", "--channel", "--time"}, set()),
    # infer.py --export stays as a flag but only refuses, pointing to export.py --format pt2|onnx (issue 19).
    # Issue 20, chunked volumes: --scale/--channel/--time pick the OME-Zarr level, channel and time point of a
    # zarr/N5/HDF5 --input (VolumeOptions, for train.py/evaluate.py later too); --chunks is the y/x chunk shape of
    # .zarr/.h5 outputs. Issue 22 item 3: --tile-plan speed|flops (speed = time a few plans on the device); item
    # 4: --backend torch|openvino (OpenVINO measured 1.5-1.75x torch bf16 on an AMX Xeon).
    # Issue 20 items 2 and 5: --block-size is the y/x size of the chunk-aligned blocks a chunked volume is predicted
    # in; --resume finishes an interrupted block-wise run, redoing only the blocks not recorded as complete.
    # Issue 20 item 6: --instance-halo (context of a block's watershed) and --instance-stitch-iou (the IoU above which
    # two blocks' ids of a cell are joined) for --instances of a block-wise run. --block-io: the block-wise run
    # reads and writes in threads beside the device loop (auto: on a GPU/NPU, not on a CPU). --host-allocator:
    # train.py's setting (glibc keeps freed memory) for infer.py's blocks and slices on the CPU (issue 22).
    "infer": ({"--scale", "--channel", "--time", "--chunks", "--precision", "--tile-plan", "--backend", "--block-size",
               "--resume", "--instance-halo", "--instance-stitch-iou", "--block-io", "--host-allocator"}, set()),
    # export.py --format bioimageio|pt2|onnx is the one way to export (issue 19); a program's static input size
    # got its own flag, since infer.py --export reused --tile-size, which means the tiling everywhere else.
    "export": ({"--example-size"}, set()),
}
# A flag at the start of a help line ("  --a, --b B") or after a comma; argparse wraps long usage lines, so the
# usage block is skipped.
FLAG = re.compile(r"(?:^\s+|,\s)(--?[A-Za-z][\w-]*)")


def help_flags(command: str, capsys) -> set[str]:
    """The flags ``<command>.py --help`` prints (the launcher train.py etc. call, run in this process)."""
    with pytest.raises(SystemExit) as e:
        getattr(commands, command)(["--help"])
    assert e.value.code == 0
    body = capsys.readouterr().out.split("\n\n", 1)[1]  # past the usage block
    return {m for line in body.splitlines() for m in FLAG.findall(line)}


@pytest.mark.parametrize("command", sorted(CHANGED))
def test_help_lists_the_flags_of_before(command, capsys):
    added, removed = CHANGED[command]
    expected = (set(BEFORE[command]) | added) - removed
    assert help_flags(command, capsys) == expected
