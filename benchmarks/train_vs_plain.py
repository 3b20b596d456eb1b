"""train.py --benchmark against a plain eager UNet of the same geometry: the CPU user's yardstick.

    python benchmarks/train_vs_plain.py --data-dir ../shared/isbi2012 [--batch-size 2] [--steps 4] [--warmup 2]
        [--precisions fp32,bf16] [--workers default,0] [--json OUT]

The yardstick is what a user writes in an afternoon (:class:`PlainUNet`, about 60 lines): the reference geometry
(5 levels, 64..1024 filters, unpadded 3x3 convs, dropout 0.5, 3x3 stride-2 transposed convs, crop-and-concat,
572 -> 388), channels_last, Adam, mean cross-entropy, bf16 by ``torch.autocast``, random tensors already in
memory (no loader at all). train.py runs as a user runs it — its own process, ISBI crops through its loader with
default augmentation, CE + soft Dice — once per ``--workers`` setting ("default" = train.py's own choice).
Rows alternate yardstick and train.py so that drift of the machine hits both alike; the ratio is the figure.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common import REPO, csv_list, device_for, fmt, machine_header, write_json  # noqa: E402

from unet.benchmarking import time_steps  # noqa: E402
from unet.model import output_size  # noqa: E402


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3), nn.ReLU(inplace=True))


def up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1), nn.ReLU(inplace=True))


def crop(x: torch.Tensor, size: int) -> torch.Tensor:
    t = (x.shape[-1] - size) // 2
    return x[..., t:t + size, t:t + size]


class PlainUNet(nn.Module):
    """The reference UNet as a user writes it plainly: no layout tricks, no fused anything."""

    def __init__(self, base: int = 64, depth: int = 5, classes: int = 2):
        super().__init__()
        widths = [base * 2 ** i for i in range(depth)]
        self.downs = nn.ModuleList(double_conv(cin, cout) for cin, cout in zip([1] + widths[:-2], widths[:-1]))
        self.bottom = double_conv(widths[-2], widths[-1])
        self.drop = nn.Dropout(0.5)
        self.ups = nn.ModuleList(up(w, w // 2) for w in reversed(widths[1:]))
        self.convs = nn.ModuleList(double_conv(w, w // 2) for w in reversed(widths[1:]))
        self.head = nn.Conv2d(base, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.5
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.drop(self.bottom(x))
        for upconv, conv, skip in zip(self.ups, self.convs, reversed(skips)):
            x = upconv(x)
            x = conv(torch.cat([x, crop(skip, x.shape[-1])], dim=1))
        return self.head(x)


def plain_images_per_s(precision: str, args) -> float:
    """Images/s of the yardstick's training step on random in-memory tensors."""
    torch.manual_seed(0)
    model = PlainUNet(args.base_filters).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch, size = args.batch_size, args.input_size
    out = output_size(size)
    x = torch.rand(batch, 1, size, size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch, out, out))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _, seconds = time_steps(step, args.warmup, args.steps, device_for("cpu", "fp32"))
    assert model(x).shape[-1] == out  # the yardstick's geometry is train.py's
    return batch / seconds


def train_py_images_per_s(args, precision: str, workers: str) -> dict:
    """train.py --benchmark in its own process, as a user runs it; its benchmark.json."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(REPO / "train.py"), "--device", "cpu", "--benchmark", "--model-dir", tmp,
               "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
               "--warmup-steps", str(args.warmup), "--no-progress", "--base-filters", str(args.base_filters),
               "--input-size", str(args.input_size)]
        cmd += ["--data-dir", args.data_dir] if args.data_dir else []
        cmd += ["--amp", "--amp-dtype", "bf16"] if precision == "bf16" else []
        cmd += [] if workers == "default" else ["--workers", workers]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"train.py failed ({done.returncode}): {done.stderr.strip()[-400:]}")
        workers_line = [ln for ln in done.stdout.splitlines() if "loader worker" in ln]
        layout_line = [ln for ln in done.stdout.splitlines() if ln.startswith("memory layout")]
        result = json.loads((Path(tmp) / "benchmark.json").read_text())
    return {"images_per_s": result["images_per_s"], "loader": workers_line[0].strip() if workers_line else "",
            "layout": layout_line[0].strip() if layout_line else ""}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="ISBI 2012 folder for train.py (default: the synthetic set)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--precisions", type=csv_list, default=["fp32", "bf16"])
    p.add_argument("--workers", type=csv_list, default=["default", "0"],
                   help="train.py --workers settings, 'default' = leave it to train.py")
    p.add_argument("--base-filters", type=int, default=64, help="both models' first-level filters (64: reference)")
    p.add_argument("--input-size", type=int, default=572, help="both models' crop (572 -> 388: reference)")
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: base 4, 188 -> 4 crops, fp32, 1 step, no warm-up, default workers")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.base_filters, args.input_size, args.steps, args.warmup = 4, 188, 1, 0
        args.precisions, args.workers = ["fp32"], ["default"]
    print(machine_header("train.py vs plain UNet", device_for("cpu", "fp32")))
    print(f"# batch {args.batch_size}, base {args.base_filters}, {args.input_size} -> {output_size(args.input_size)}, "
          f"{args.warmup} warmup + {args.steps} timed steps per row; train.py data: {args.data_dir or 'synthetic'}")
    rows = []
    for precision in args.precisions:
        for workers in args.workers:
            plain = plain_images_per_s(precision, args)
            ours = train_py_images_per_s(args, precision, workers)
            rows.append({"precision": precision, "workers": workers, "plain_images_per_s": plain,
                         "train_py_images_per_s": ours["images_per_s"],
                         "ratio": ours["images_per_s"] / plain, "loader": ours["loader"], "layout": ours["layout"]})
            r = rows[-1]
            print(f"{precision:>5}  train.py --workers {workers:>7}: {fmt(r['train_py_images_per_s'], '.3f')} img/s"
                  f"   plain UNet: {fmt(plain, '.3f')} img/s   ratio {r['ratio']:.2f}x   {r['loader']}"
                  + (f"\n       train.py's {r['layout']}" if r["layout"] else ""), flush=True)
    write_json(args.json, {"benchmark": "train_vs_plain", "batch_size": args.batch_size, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
