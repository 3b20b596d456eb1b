import pytest
import torch

from unet.model import ModelConfig, UNet, input_size_for_output, output_size, valid_input_size


def test_reference_geometry_and_parameter_count():
    model = UNet()
    assert sum(p.numel() for p in model.parameters()) == 34_512_258
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 1, 572, 572))
    assert out.shape == (1, 2, 388, 388)
    assert model.output_size(572) == 388
    assert model.output_size(700) == 516  # covers a 512x512 ISBI slice, but not with its 15-px edge band (716 does)


@pytest.mark.parametrize("shape", [(256, 256), (320, 480)])
def test_same_padding_keeps_size(shape):
    model = UNet(base_filters=4, padding="same").eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, *shape))
    assert out.shape == (2, 2, *shape)


def test_invalid_sizes_name_the_nearest_valid_ones():
    with pytest.raises(ValueError, match=r"input size 573 .* nearest valid sizes are 572 or 588"):
        output_size(573)
    with pytest.raises(ValueError, match=r"divisible by 16.*nearest valid sizes are 320 or 336"):
        output_size(330, padding="same")
    with pytest.raises(ValueError, match="not valid"):
        output_size(100)  # too small to survive four poolings unpadded
    model = UNet(base_filters=4, padding="same")
    with pytest.raises(ValueError, match="input size 330"):
        model(torch.rand(1, 1, 320, 330))  # same padding would otherwise silently crop a skip


def test_size_helpers_agree_with_a_real_forward_pass():
    model = UNet(base_filters=2, depth=3).eval()
    for n in (44, 45, 60, 61, 100, 101):
        v = model.valid_input_size(n)
        assert v >= n and model.valid_input_size(v) == v
        for smaller in range(n, v):  # v is the smallest valid size >= n
            with pytest.raises(ValueError, match="not valid"):
                model.output_size(smaller)
        with torch.no_grad():
            assert model(torch.rand(1, 1, v, v)).shape[-1] == model.output_size(v)
    assert output_size(input_size_for_output(388)) == 388
    assert valid_input_size(1) == 188 and output_size(188) == 4


def test_config_options_and_validation():
    model = UNet(in_channels=3, num_classes=4, base_filters=8, depth=4, batch_norm=True,
                 class_names=["a", "b", "c", "d"], padding="same").eval()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 4, 64, 64)
    with pytest.raises(ValueError, match="padding must be one of"):
        ModelConfig(padding="reflect")
    with pytest.raises(ValueError, match="class_names has 2 names for 3 classes"):
        ModelConfig(num_classes=3)
    assert ModelConfig.from_dict(model.config.to_dict()) == model.config


def test_dropout_only_in_training():
    model = UNet(base_filters=4, padding="same")
    x = torch.rand(1, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("autocast", [False, True])
def test_forward_backward_cpu(autocast):
    model = UNet(base_filters=4, padding="same")
    x = torch.rand(2, 1, 48, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    out.float().logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_up_block_keeps_channels_last_through_crop_and_concat_with_the_same_values():
    from unet.model import Up
    cl = torch.channels_last
    torch.manual_seed(0)
    up = Up(32, 16, "valid", False)
    x, skip = torch.randn(2, 16, 20, 20), torch.randn(2, 16, 30, 30)
    grad = torch.randn(2, 8, 32, 32)

    def run(block, a, b):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = block(a, b)
        # autograd.grad, not .backward(): a leaf's .grad is restrided to the leaf's layout, which would hide
        # the layout the gradient arrives in (what the skip's other, pooling-branch gradient is added to).
        return (out, *torch.autograd.grad(out, (a, b), grad))

    ref_out, ref_gx, ref_gskip = run(up, x, skip)
    up_cl = Up(32, 16, "valid", False).to(memory_format=cl)
    up_cl.load_state_dict(up.state_dict())
    out, gx, gskip = run(up_cl, x.contiguous(memory_format=cl), skip.contiguous(memory_format=cl))
    assert out.is_contiguous(memory_format=cl) and not out.is_contiguous()
    # The skip's gradient (zero outside the crop) stays channels_last too: it is added to the pooling branch's.
    # (x's gradient is cat's backward: a channel slice of a channels_last gradient, a view in no standard layout.)
    assert gskip.is_contiguous(memory_format=cl) and not gskip.is_contiguous()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gskip, ref_gskip)
    assert gskip[..., :5, :].abs().sum() == 0 and gskip[..., 5:25, 5:25].abs().sum() > 0


def test_reference_state_dict_keys_unchanged():
    # Old checkpoints must keep loading: the parameter names are part of the checkpoint format.
    keys = list(UNet().state_dict())
    assert len(keys) == 46 and keys[:4] == ["downs.0.conv.0.weight", "downs.0.conv.0.bias", "downs.0.conv.2.weight",
                                            "downs.0.conv.2.bias"]
    assert keys[-2:] == ["out.head.weight", "out.head.bias"] and "bottleneck.up.0.weight" in keys
