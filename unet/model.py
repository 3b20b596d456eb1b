"""The UNet (Ronneberger et al. 2015) as configured in NVIDIA's UNet_Medical, and its size arithmetic.

The default configuration reproduces UNet_Medical exactly: 5 levels of 64-128-256-512-1024 filters,
unpadded 3x3 convolutions, dropout 0.5 after the bottleneck, 3x3 stride-2 transposed convolutions for
upsampling, crop-and-concatenate skips and a 1x1 convolution to 2 logits: 572x572 in, 388x388 out,
34,512,258 parameters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

PADDINGS = ("valid", "same")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a UNet and feed it: architecture plus input normalisation.

    Stored in every checkpoint so that evaluation and inference need nothing but the checkpoint.

    Args:
        in_channels: channels of the input image.
        num_classes: output logits per pixel (2: membrane = 0, cell interior = 1).
        base_filters: filters of the first level; level i has ``base_filters * 2**i``.
        depth: number of levels including the bottleneck.
        padding: ``valid`` (unpadded convolutions, output smaller than input) or ``same``.
        batch_norm: add BatchNorm after every 3x3 convolution.
        dropout: dropout probability after the bottleneck (training only).
        mean, std: input normalisation ``(x - mean) / std``, applied by the model itself to images
            already scaled by dtype to [0, 1], so training, evaluation, inference and exported
            programs can never disagree about it (default: [0, 1] -> [-1, 1]).
        class_names: what each output class means.
    """

    in_channels: int = 1
    num_classes: int = 2
    base_filters: int = 64
    depth: int = 5
    padding: str = "valid"
    batch_norm: bool = False
    dropout: float = 0.5
    mean: float = 0.5
    std: float = 0.5
    class_names: list[str] = field(default_factory=lambda: ["membrane", "cell"])

    def __post_init__(self):
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.depth < 2:
            raise ValueError(f"depth must be at least 2 (one pooling level), got {self.depth}")
        if self.base_filters < 1 or self.in_channels < 1 or self.num_classes < 2:
            raise ValueError("base_filters and in_channels must be >= 1 and num_classes >= 2")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {self.num_classes} classes")
        if not self.std > 0:
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)


def _conv3x3(in_ch: int, out_ch: int, padding: str, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1 if padding == "same" else 0,
                                         bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by (optional BatchNorm and) ReLU."""

    def __init__(self, in_ch: int, out_ch: int, padding: str = "valid", batch_norm: bool = False):
        super().__init__(*_conv3x3(in_ch, out_ch, padding, batch_norm), *_conv3x3(out_ch, out_ch, padding, batch_norm))


class UpConv(nn.Sequential):
    """3x3 stride-2 transposed convolution + ReLU: exactly doubles height and width.

    A stride-2, 3-wide kernel cannot double a size with every output pixel inside the input's reach: one
    edge row/column reads an implicit zero (top/left in TensorFlow's ``padding="same"`` used by
    UNet_Medical, bottom/right here). Stacked over the decoder that is :attr:`UNet.edge_band` pixels,
    which the tiler keeps away from tile seams.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1),
                         nn.ReLU(inplace=True))


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop the spatial centre of an NCHW tensor to ``height`` x ``width``."""
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top:top + height, left:left + width]


class _LayoutKeepingCrop(torch.autograd.Function):
    """:func:`center_crop` whose backward zero-pads the gradient in the input's memory format.

    The plain slice's backward (``slice_backward``) builds a contiguous NCHW zero tensor; in a UNet that
    gradient is then added to the skip's channels_last gradient from the pooling branch, and an add across
    two layouts runs several times slower than within one (fp32, 2 x 64 x 568 x 568 on 2 CPU cores: 0.46 s vs
    0.07 s). Forward is the same view, so values are unchanged.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        ctx.shape, ctx.height, ctx.width = x.shape, height, width
        ctx.channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous()
        return center_crop(x, height, width)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
        grad_in = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=layout)
        # Only the margin around the crop is zeroed: the centre is overwritten at once (zeroing the whole
        # 2 x 64 x 568 x 568 float32 gradient cost 1.5 % of a reference step on 2 cores).
        top, left = (ctx.shape[-2] - ctx.height) // 2, (ctx.shape[-1] - ctx.width) // 2
        grad_in[..., :top, :].zero_()
        grad_in[..., top + ctx.height:, :].zero_()
        grad_in[..., top:top + ctx.height, :left].zero_()
        grad_in[..., top:top + ctx.height, left + ctx.width:].zero_()
        center_crop(grad_in, ctx.height, ctx.width).copy_(grad)
        return grad_in, None, None


def crop_skip(skip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The skip connection's centre crop for concatenation, channels_last in forward and backward alike.

    Eager training uses :class:`_LayoutKeepingCrop`; without autograd (inference, export), while tracing and
    under ``torch.compile`` (whose compiler plans the layouts itself) it is the plain slice.
    """
    # Tracing (TorchScript, ONNX) must see the plain slice: a custom autograd Function traces differently per call.
    if (skip.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()):
        return _LayoutKeepingCrop.apply(skip, height, width)
    return center_crop(skip, height, width)


class Down(nn.Module):
    """Encoder level: DoubleConv, then 2x2 max-pool; returns (pooled, skip)."""

    def __init__(self, in_ch: int, out_ch: int, padding: str, batch_norm: bool):
        super().__init__()
        self.conv = DoubleConv(in_ch, out_ch, padding, batch_norm)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.conv(x)
        return self.pool(skip), skip


class Bottleneck(nn.Module):
    """DoubleConv, dropout (training only), then upsampling to the next decoder level."""

    def __init__(self, in_ch: int, out_ch: int, padding: str, batch_norm: bool, dropout: float):
        super().__init__()
        self.conv = DoubleConv(in_ch, out_ch, padding, batch_norm)
        self.dropout = nn.Dropout(dropout)
        self.up = UpConv(out_ch, out_ch // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.conv(x)))


class Up(nn.Module):
    """Decoder level: concat(upsampled, cropped skip), DoubleConv, then upsampling."""

    def __init__(self, in_ch: int, out_ch: int, padding: str, batch_norm: bool):
        super().__init__()
        self.conv = DoubleConv(in_ch, out_ch, padding, batch_norm)
        self.up = UpConv(out_ch, out_ch // 2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        skip = crop_skip(skip, x.shape[-2], x.shape[-1])
        return self.up(self.conv(torch.cat([x, skip], dim=1)))


class OutBlock(nn.Module):
    """Last level: concat(upsampled, cropped skip), DoubleConv, 1x1 convolution to class logits."""

    def __init__(self, in_ch: int, mid_ch: int, num_classes: int, padding: str, batch_norm: bool):
        super().__init__()
        self.conv = DoubleConv(in_ch, mid_ch, padding, batch_norm)
        self.head = nn.Conv2d(mid_ch, num_classes, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        skip = crop_skip(skip, x.shape[-2], x.shape[-1])
        return self.head(self.conv(torch.cat([x, skip], dim=1)))


class UNet(nn.Module):
    """UNet returning per-pixel class logits (no activation).

    Args:
        config: a :class:`ModelConfig`; keyword arguments override its fields (or build one).

    Example:
        >>> model = UNet()                      # NVIDIA UNet_Medical: 572x572 -> 388x388
        >>> small = UNet(base_filters=16, padding="same")
    """

    def __init__(self, config: ModelConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = ModelConfig(**overrides)
        elif overrides:
            config = ModelConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        c, p, bn = config, config.padding, config.batch_norm
        filters = [c.base_filters * 2 ** i for i in range(c.depth)]
        self.downs = nn.ModuleList(
            Down(c.in_channels if i == 0 else filters[i - 1], filters[i], p, bn) for i in range(c.depth - 1))
        self.bottleneck = Bottleneck(filters[-2], filters[-1], p, bn, c.dropout)
        # Each decoder level sees its upsampled input (f // 2 channels) concatenated with an equal skip.
        self.ups = nn.ModuleList(Up(filters[i + 1], filters[i], p, bn) for i in reversed(range(1, c.depth - 1)))
        self.out = OutBlock(filters[1], filters[0], c.num_classes, p, bn)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal weights, std sqrt(2 / fan_in), zero biases, as the UNet paper prescribes.

        torch's default (uniform with a = sqrt(5)) has a third of that variance, so the signal
        shrinks through the 23 ReLU layers of this network without normalisation and training starts slowly.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                # ConvTranspose2d weights are (in, out, k, k), so torch's "fan_out" is the in_channels * k * k side.
                mode = "fan_out" if isinstance(m, nn.ConvTranspose2d) else "fan_in"
                nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes, h, w)`` for images ``(N, in_channels, H, W)`` scaled to [0, 1]."""
        for n in x.shape[-2:]:
            self.output_size(int(n))  # a clear error instead of silently misaligned skips
        x = (x - self.config.mean) / self.config.std
        skips = []
        for down in self.downs:
            x, skip = down(x)
            skips.append(skip)
        x = self.bottleneck(x)
        for up in self.ups:
            x = up(x, skips.pop())
        return self.out(x, skips.pop())

    # Size arithmetic, so that samplers and tilers never hard-code 572 -> 388.
    @property
    def padding(self) -> str:
        return self.config.padding

    @property
    def edge_band(self) -> int:
        """Bottom/right output rows/columns of a tile that depend on pixels beyond it (see UpConv)."""
        return 2 ** (self.config.depth - 1) - 1

    def output_size(self, input_size: int) -> int:
        """Output height (or width) for an input height (or width); ValueError if it is not valid."""
        return output_size(input_size, self.config.depth, self.config.padding)

    def valid_input_size(self, min_size: int) -> int:
        """Smallest valid input size >= ``min_size``."""
        return valid_input_size(min_size, self.config.depth, self.config.padding)

    def input_size_for_output(self, min_output: int) -> int:
        """Smallest valid input size whose output is at least ``min_output``."""
        return input_size_for_output(min_output, self.config.depth, self.config.padding)


def _trace(n: int, depth: int, padding: str) -> int | None:
    """Follow a size through the network; None where a pooling sees an odd size or a size reaches < 1."""
    shrink = 4 if padding == "valid" else 0
    for _ in range(depth - 1):
        n -= shrink
        if n < 2 or n % 2:
            return None
        n //= 2
    n -= shrink  # bottleneck convolutions
    if n < 1:
        return None
    for _ in range(depth - 1):
        n = 2 * n - shrink
        if n < 1:
            return None
    return n


def output_size(input_size: int, depth: int = 5, padding: str = "valid") -> int:
    """Output size of a UNet for ``input_size``.

    Raises:
        ValueError: naming the nearest valid sizes when ``input_size`` is not valid.
    """
    out = _trace(int(input_size), depth, padding)
    if out is None:
        lo = _nearest_valid(input_size, depth, padding, step=-1)
        hi = valid_input_size(input_size, depth, padding)
        near = f"{lo} or {hi}" if lo else f"{hi}"
        rule = (f"(n - 4) must stay even through {depth - 1} poolings" if padding == "valid"
                else f"n must be divisible by {2 ** (depth - 1)}")
        raise ValueError(f"input size {input_size} is not valid for a depth-{depth} '{padding}' UNet: "
                         f"{rule}; the nearest valid sizes are {near}")
    return out


def _nearest_valid(n: int, depth: int, padding: str, step: int) -> int | None:
    n = max(int(n), 1)
    while n >= 1:
        if _trace(n, depth, padding) is not None:
            return n
        n += step
        if step > 0 and n > 1 << 20:
            break
    return None


def valid_input_size(min_size: int, depth: int = 5, padding: str = "valid") -> int:
    """Smallest valid input size >= ``min_size``."""
    return _nearest_valid(min_size, depth, padding, step=1)


def input_size_for_output(min_output: int, depth: int = 5, padding: str = "valid") -> int:
    """Smallest valid input size whose output size is >= ``min_output``."""
    n = valid_input_size(max(min_output, 1), depth, padding)
    while _trace(n, depth, padding) < min_output:
        n = valid_input_size(n + 1, depth, padding)
    return n
