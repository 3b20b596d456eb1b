"""The tiny UNet the inference tests share: random weights, but both classes appear in its masks."""
import torch

from unet.model import UNet


def balanced_unet(padding: str = "same", seed: int = 0, probe: int = 64, **kw) -> UNet:
    """A 2-filter, depth-2 UNet whose head bias is shifted by the median logit gap on a random probe image, so
    that about half its pixels are cells: masks that are all one class would make the tests vacuous.

    Args:
        padding: the model's padding.
        seed: weights seed.
        probe: side of the random probe image (a valid input size for ``padding``).
        kw: further ModelConfig fields (e.g. in_channels).
    """
    torch.manual_seed(seed)
    model = UNet(base_filters=2, depth=2, padding=padding, **kw).eval()
    with torch.no_grad():
        for m in model.modules():  # positive biases keep the 2-filter ReLUs alive, so logits vary per pixel
            if isinstance(m, torch.nn.Conv2d):
                m.bias.fill_(0.1)
        logits = model(torch.rand(1, model.config.in_channels, probe, probe))
        model.out.head.bias[1] -= (logits[0, 1] - logits[0, 0]).median()
    return model
