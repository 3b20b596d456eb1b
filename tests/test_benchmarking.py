"""Peak figures MFU is read against: the datasheet table's H100 forms and the CPU's theoretical peak."""
import pytest
import torch

from unet.benchmarking import _matmul_side, cpu_theoretical_peak
from unet.device import DeviceSetup


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
                                          ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA GeForce RTX 4090", None)])
def test_datasheet_peak_tells_the_h100_forms_apart(monkeypatch, name, tflops):
    monkeypatch.setattr(DeviceSetup, "name", lambda self: name)
    dev = DeviceSetup(torch.device("cuda", 0), amp=True, amp_dtype=torch.bfloat16)
    assert dev.peak_flops() == (tflops * 1e12 if tflops else None)


def test_cpu_theoretical_peak_from_the_isa():
    avx512_amx = {"vendor_id": "GenuineIntel", "cpu family": "6", "cpu MHz": "2600.000",
                  "flags": "fpu sse avx2 fma avx512f avx512_bf16 amx_bf16"}
    peak = cpu_theoretical_peak(cores=2, info=avx512_amx)
    # 2 cores x 2.6 GHz x (2 FMA pipes x 16 fp32 lanes x 2) ; AMX: 1024 bf16 FLOP per cycle
    assert peak["fp32"] == pytest.approx(2 * 2.6e9 * 64) and peak["bf16"] == pytest.approx(2 * 2.6e9 * 1024)
    assert "2 cores x 2.60 GHz x 64 FLOP/cycle" in peak["description"]
    zen4 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "cpu MHz": "2000", "flags": "avx2 fma avx512f avx512_bf16"}
    peak = cpu_theoretical_peak(cores=4, info=zen4)  # AVX-512 on 256-bit pipes: half the lanes per cycle
    assert peak["fp32"] == pytest.approx(4 * 2e9 * 32) and peak["bf16"] == pytest.approx(4 * 2e9 * 64)
    avx2 = cpu_theoretical_peak(cores=1, info={"cpu MHz": "3000", "flags": "avx2 fma"})
    assert avx2["fp32"] == pytest.approx(3e9 * 32) and avx2["bf16"] == avx2["fp32"]
    unknown = cpu_theoretical_peak(cores=1, info={"flags": "sse"})
    assert unknown["fp32"] is None and "unknown" in unknown["description"]


def test_the_matmul_side_shrinks_only_when_one_matmul_would_not_fit_the_time():
    cpu = torch.device("cpu")
    # fp32 on any CPU: a 2048 matmul (17 GFLOP) takes well under 4 x 1 s, so the reading keeps its size
    assert _matmul_side(cpu, torch.float32, 2048, 1.0, lambda: None) == 2048
    # 0.1 ms for a 2048 matmul is beyond any CPU: the side falls to the 512 probe's
    assert _matmul_side(cpu, torch.float32, 2048, 1e-4, lambda: None) == 512
    assert _matmul_side(cpu, torch.float32, 256, 1e-4, lambda: None) == 256  # never above the side asked for
