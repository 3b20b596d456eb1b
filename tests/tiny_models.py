"""The tiny UNet the inference tests share: random weights, but every class appears in its masks."""
import torch

from unet.model import UNet


def balanced_unet(padding: str = "same", seed: int = 0, probe: int = 64, base_filters: int = 2, depth: int = 2,
                  **kw) -> UNet:
    """A small UNet whose head bias is shifted so that every class wins on part of a random probe image: masks that
    are all one class would make the tests vacuous. Two classes: the bias of class 1 moves by the median logit gap
    (about half the pixels are cells); K classes: each class's logit is centred on its median.

    Args:
        padding: the model's padding.
        seed: weights seed.
        probe: side of the random probe image (a valid input size for ``padding``).
        base_filters, depth: the model's size (2 and 2: the smallest).
        kw: further ModelConfig fields (e.g. in_channels, num_classes).
    """
    torch.manual_seed(seed)
    model = UNet(base_filters=base_filters, depth=depth, padding=padding, **kw).eval()
    with torch.no_grad():
        for m in model.modules():  # positive biases keep the 2-filter ReLUs alive, so logits vary per pixel
            if isinstance(m, torch.nn.Conv2d):
                m.bias.fill_(0.1)
        logits = model(torch.rand(1, model.config.in_channels, probe, probe))
        if model.config.num_classes == 2:
            model.out.head.bias[1] -= (logits[0, 1] - logits[0, 0]).median()
        else:
            model.out.head.bias -= logits[0].flatten(1).median(1).values
    return model
