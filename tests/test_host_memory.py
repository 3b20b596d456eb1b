"""unet.host_memory (train.py --host-allocator): with glibc told to keep freed memory, training steps whose
tensors exceed glibc's mmap threshold reuse mapped pages instead of faulting them in anew every step. Each case
runs in a subprocess: the setting is process-wide and would change every later test's memory."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Forward + backward of two convolutions on a 32 MiB input: activations and gradients of 32 MiB each, the
# pattern of a UNet step at full size (the reference model's are 84 MB).
SCRIPT = textwrap.dedent("""
    import resource, sys
    if sys.argv[1] == "keep":
        from unet.host_memory import keep_freed_memory
        print(keep_freed_memory())
    import torch
    torch.set_num_threads(1)
    x = torch.rand(1, 8, 1024, 1024, requires_grad=True)
    w = torch.rand(8, 8, 3, 3, requires_grad=True)
    def faults_of_a_step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = torch.nn.functional.conv2d(x, w, padding=1).relu()
        torch.nn.functional.conv2d(y, w, padding=1).relu().sum().backward()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(*[faults_of_a_step() for _ in range(4)])
""")
ON_LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's")


def _faults(mode: str) -> tuple[list[str], list[int]]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    lines = done.stdout.strip().splitlines()
    return lines[:-1], [int(v) for v in lines[-1].split()]


@ON_LINUX
def test_kept_memory_makes_later_steps_fault_far_fewer_pages_in():
    said, faults = _faults("keep")
    assert said == ["host allocator: glibc heap, freed memory kept for reuse (no mmap per large tensor)"]
    assert faults[0] >= 8192  # the first step maps its 32 MiB tensors (8192 pages each)
    # Later steps reuse them: at most a few tensors' pages fault again (where the heap's free blocks did not fit),
    # against ~200,000 faults in every step with glibc's defaults (below), more than the first step's.
    assert max(faults[1:]) < faults[0] / 2, faults


def _huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@ON_LINUX
@pytest.mark.skipif(_huge_pages_always(), reason="huge pages back glibc's mmaps: few faults either way")
def test_with_glibc_defaults_every_step_faults_its_tensors_in_again():
    said, faults = _faults("system")
    assert said == []
    assert min(faults[1:]) > faults[0] / 2, faults  # each step maps and zeroes its 32 MiB tensors anew
