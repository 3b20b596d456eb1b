"""CE + soft Dice loss (NVIDIA UNet_Medical) against hand-computed values."""
import math

import pytest
import torch

from unet.losses import ce_dice_loss
from unet.metrics.dice import soft_dice


def test_hand_computed_tiny_case():
    # One image, two pixels, two classes. Logits (0, 1) and (1, 0); targets 1 and 0.
    logits = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])  # (N=1, K=2, H=1, W=2)
    target = torch.tensor([[[1, 0]]])
    # softmax: a = 1 / (1 + e) = 0.268941, b = e / (1 + e) = 0.731059; both pixels put b on the true class.
    a, b = 1 / (1 + math.e), math.e / (1 + math.e)
    ce = -math.log(b)  # 0.313262 at both pixels
    # Class 0: p = (a, b), t = (0, 1): dice = 2b / (a^2 + b^2 + 1) = 1.462117 / 1.606776 = 0.909969.
    # Class 1: p = (b, a), t = (1, 0): the same by symmetry.
    dice = (2 * b + 1e-6) / (a * a + b * b + 1 + 1e-6)
    assert dice == pytest.approx(0.909969, abs=1e-6)
    expected = ce + (1 - dice)  # 0.313262 + 0.090031 = 0.403293
    assert expected == pytest.approx(0.403293, abs=1e-6)
    assert ce_dice_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)


def test_soft_dice_is_per_image_and_class():
    probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],     # image 0: perfect
                          [[0.5, 0.5], [0.5, 0.5]]])    # image 1: uniform
    onehot = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                           [[1.0, 0.0], [0.0, 1.0]]])
    d = soft_dice(probs, onehot)
    assert d.shape == (2, 2)
    assert torch.allclose(d[0], torch.ones(2))
    # image 1, each class: 2 * 0.5 / (0.25 + 0.25 + 1) = 2/3
    assert torch.allclose(d[1], torch.full((2,), 2 / 3), atol=1e-6)
    # An empty class predicted empty scores 1 thanks to eps (NVIDIA's behaviour).
    assert soft_dice(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)).item() == pytest.approx(1.0)


def test_matches_naive_formula_on_random_batch():
    logits = torch.randn(3, 2, 7, 5)
    target = torch.randint(0, 2, (3, 7, 5))
    p = logits.softmax(1)
    t = torch.stack([(target == k).float() for k in range(2)], 1)
    ce = -(t * p.log()).sum(1).mean()
    dice = torch.empty(3, 2)
    for n in range(3):
        for k in range(2):
            dice[n, k] = (2 * (p[n, k] * t[n, k]).sum() + 1e-6) / ((p[n, k] ** 2).sum() + (t[n, k] ** 2).sum() + 1e-6)
    assert torch.allclose(ce_dice_loss(logits, target), ce + (1 - dice).mean(), atol=1e-6)


def test_gradient_flows():
    logits = torch.randn(2, 2, 6, 6, requires_grad=True)
    loss = ce_dice_loss(logits, torch.randint(0, 2, (2, 6, 6)))
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_perfect_prediction_leaves_only_tiny_ce():
    target = torch.randint(0, 2, (2, 8, 8))
    logits = 20.0 * torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float()
    ce = torch.nn.functional.cross_entropy(logits, target)
    loss = ce_dice_loss(logits, target)
    assert ce < 1e-6
    assert loss.item() == pytest.approx(ce.item(), abs=1e-6)


def test_float32_under_autocast_and_half_logits():
    logits = torch.randn(1, 2, 8, 8).bfloat16()
    target = torch.randint(0, 2, (1, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ce_dice_loss(logits, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ce_dice_loss(logits.float(), target).item(), abs=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        ce_dice_loss(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError):
        ce_dice_loss(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError):
        soft_dice(torch.rand(1, 2, 4), torch.rand(1, 2, 5))


def _losses_before_ignore(logits, target, weights=None, eps=1e-6):
    """ce_dice_loss and weighted_cross_entropy as they were before ignored pixels (issue 21), verbatim."""
    logits = logits.float()
    if weights is not None:
        per_pixel = torch.nn.functional.cross_entropy(logits, target.long(), reduction="none")
        return (weights.float() * per_pixel).mean()
    target = target.long()
    ce = torch.nn.functional.cross_entropy(logits, target)
    probs = logits.softmax(dim=1)
    onehot = torch.nn.functional.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    return ce + (1 - soft_dice(probs, onehot, eps)).mean()


@pytest.mark.parametrize("num_classes", [2, 3, 5])
@pytest.mark.parametrize("weighted", [False, True])
def test_targets_without_ignore_give_bit_identical_losses_and_gradients(num_classes, weighted):
    from unet.losses import weighted_cross_entropy
    gen = torch.Generator().manual_seed(num_classes)
    # 3 images (not a power of two: a factor N / N computed as N * (1 / N) would not be exactly 1)
    logits = 3 * torch.randn(3, num_classes, 19, 23, generator=gen)
    target = torch.randint(0, num_classes, (3, 19, 23), generator=gen).to(torch.uint8)  # the loader's dtype
    weights = 10 * torch.rand(3, 19, 23, generator=gen) if weighted else None
    old, new = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    before = _losses_before_ignore(old, target, weights)
    after = weighted_cross_entropy(new, target, weights) if weighted else ce_dice_loss(new, target)
    before.backward()
    after.backward()
    assert torch.equal(before, after)
    assert torch.equal(old.grad, new.grad)
