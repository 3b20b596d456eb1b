import os

import pytest
import torch

from unet.device import DeviceSetup, dist_backend, resolve_device_type, setup_device
from unet.errors import UserError

YES, NO = (lambda: True), (lambda: False)


@pytest.mark.parametrize("npu,cuda,expected", [(YES, YES, "npu"), (NO, YES, "cuda"), (NO, NO, "cpu")])
def test_auto_prefers_npu_then_cuda_then_cpu(npu, cuda, expected):
    assert resolve_device_type("auto", {"npu": npu, "cuda": cuda}) == expected


def test_explicit_device_must_be_available():
    assert resolve_device_type("cpu", {"npu": NO, "cuda": NO}) == "cpu"
    assert resolve_device_type("cuda", {"cuda": YES}) == "cuda"
    with pytest.raises(UserError, match="--device npu was asked for but no NPU is available: install torch_npu"):
        resolve_device_type("npu", {"npu": NO})
    with pytest.raises(UserError, match="--device must be one of auto, npu, cuda, cpu"):
        resolve_device_type("tpu")


def test_backend_map():
    assert dist_backend("cpu") == "gloo"
    assert dist_backend("cuda") == "nccl"
    assert dist_backend("npu") == "hccl"


def test_cpu_setup_amp_defaults_to_bf16_and_runs_for_real():
    dev = setup_device("cpu", amp=True)
    assert dev.device == torch.device("cpu") and dev.amp_dtype == torch.bfloat16 and dev.amp_name == "bf16"
    assert dev.memory_format == torch.channels_last and dev.pin_memory is False
    assert not dev.grad_scaler().is_enabled()  # bf16 needs no loss scaling
    model = dev.prepare_model(torch.nn.Conv2d(1, 4, 3))
    x = dev.to_device(torch.rand(2, 1, 16, 16))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with dev.autocast():
        y = model(x)
    assert y.dtype == torch.bfloat16
    assert dev.peak_memory_bytes() > 0 and dev.name()


def test_fp16_gets_an_enabled_scaler_and_fp32_none():
    assert setup_device("cpu", amp=True, amp_dtype="fp16").grad_scaler().is_enabled()
    off = setup_device("cpu")
    assert off.amp_name == "fp32" and not off.grad_scaler().is_enabled()
    with off.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(UserError, match="--amp-dtype must be one of bf16, fp16"):
        setup_device("cpu", amp=True, amp_dtype="fp8")


def test_default_cuda_probe_follows_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device_type("auto", {"npu": NO}) == "cuda"


def test_datasheet_peak_is_16_bit_only(monkeypatch):
    monkeypatch.setattr(DeviceSetup, "name", lambda self: "NVIDIA H100 80GB HBM3")
    bf16 = DeviceSetup(torch.device("cuda", 0), amp=True, amp_dtype=torch.bfloat16)
    assert bf16.peak_flops() == 989e12 and bf16.peak_flops("fp16") == 989e12
    assert bf16.peak_flops("fp32") is None  # the datasheet figure is no bar for fp32/TF32
    assert DeviceSetup(torch.device("cuda", 0)).peak_flops() is None  # an fp32 setup
    monkeypatch.setattr(DeviceSetup, "name", lambda self: "Unknown Accelerator 9000")
    assert bf16.peak_flops() is None
    assert setup_device("cpu", amp=True).peak_flops() is None


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset peak RSS")
def test_cpu_peak_memory_resets_to_the_current_workload():
    dev = setup_device("cpu")
    dev.reset_peak_memory()
    base = dev.peak_memory_bytes()
    big = torch.ones(256 * 2 ** 20 // 4)  # 256 MiB, freed (unmapped) below
    assert dev.peak_memory_bytes() >= base + 200 * 2 ** 20
    del big
    dev.reset_peak_memory()
    assert dev.peak_memory_bytes() < base + 100 * 2 ** 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_setup_for_real():
    dev = setup_device("cuda", amp=True)
    assert dev.device.type == "cuda" and torch.backends.cudnn.benchmark
    assert dev.amp_dtype == (torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16)


@pytest.mark.skipif(getattr(torch, "npu", None) is None, reason="needs torch_npu and an Ascend NPU")
def test_npu_setup_for_real():
    dev = setup_device("npu", amp=True, amp_dtype="fp16")
    assert dev.memory_format == torch.contiguous_format and dev.grad_scaler().is_enabled()


class FakeDevice:
    """A device of a given type (torch.device("npu") needs torch_npu loaded)."""

    def __init__(self, type):
        self.type = type


def test_compile_by_default_on_cuda_only():
    # Device types are mocked: no CUDA or NPU is needed to build the setup objects.
    assert DeviceSetup(torch.device("cuda", 0)).compile_by_default is True
    assert DeviceSetup(torch.device("cpu")).compile_by_default is False  # measured slower on CPU
    assert DeviceSetup(FakeDevice("npu")).compile_by_default is False  # not measured on an NPU


def test_fused_adam_on_cuda_and_cpu_not_npu():
    assert DeviceSetup(torch.device("cuda", 0)).optimizer_kwargs() == {"fused": True}
    assert DeviceSetup(torch.device("cpu")).optimizer_kwargs() == {"fused": True}
    assert DeviceSetup(FakeDevice("npu")).optimizer_kwargs() == {}


def test_fused_cpu_adam_takes_the_steps_of_torchs_default_adam():
    torch.manual_seed(0)
    params = [torch.randn(64, 32, 3, 3), torch.randn(64)]
    runs = []
    for kwargs in ({}, DeviceSetup(torch.device("cpu")).optimizer_kwargs()):
        ps = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.Adam(ps, lr=1e-3, weight_decay=5e-4, **kwargs)
        for k in range(5):
            for p in ps:
                p.grad = torch.sin(p.detach() * (k + 1))
            opt.step()
        runs.append(ps)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, params[0] if a.dim() == 4 else params[1])  # the steps moved them


def test_prefetcher_on_cpu_yields_the_plain_iterators_batches_bit_for_bit():
    from unet.data.datasets import synthetic_dataset
    from unet.data.sampling import TrainTiles, build_train_loader
    from unet.device import Prefetcher
    tiles = TrainTiles(synthetic_dataset(count=3, size=64, seed=2), 44, 4, seed=1)
    dev = DeviceSetup(torch.device("cpu"), memory_format=torch.channels_last)
    plain = iter(build_train_loader(tiles, 3, 0, pin_memory=False))
    fetched = Prefetcher(iter(build_train_loader(tiles, 3, 0, pin_memory=False)), dev)
    assert fetched.stream is None  # CPU: a pass-through
    for _ in range(4):
        (x, y), (fx, fy) = next(plain), next(fetched)
        assert torch.equal(x, fx) and torch.equal(y, fy) and fy.dtype == torch.uint8
        assert fx.is_contiguous(memory_format=torch.channels_last)  # moved as DeviceSetup.to_device moves it
    assert list(Prefetcher(iter([(torch.ones(1),)]), dev)) == [(torch.ones(1),)]  # a finite stream ends


def test_cudnn_benchmark_limit_raised_in_cuda_speed_settings(monkeypatch):
    from unet import device
    monkeypatch.setattr(torch.backends.cudnn, "benchmark_limit", 10)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    # Restored by hand: cuda.matmul's flags live in torch's C++ state behind __getattr__, which pytest >= 9.2's
    # monkeypatch takes for a missing attribute and then fails to delete on teardown.
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        device.apply_speed_settings("cuda")  # flags only: needs no GPU
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    assert torch.backends.cudnn.benchmark_limit == 0 and torch.backends.cudnn.benchmark is True
