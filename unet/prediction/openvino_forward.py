"""infer.py --backend openvino: the model's forward pass run by OpenVINO's CPU plugin instead of torch.

Measured on a 2-core Xeon with AMX (benchmarks/openvino_vs_torch.py, docs/benchmarks.md): one tile in bf16
took 162 ms against torch's 284 ms (reference model) and 22 ms against 33 ms (small model), with masks as
close to torch fp32's as torch's own bf16 (0.031 % of pixels against 0.030 % on ISBI slices, trained model).
It is optional (``pip install openvino``): nothing else in the project needs it.

The model is converted once per input shape (OpenVINO compiles static shapes fastest; the pipeline pads the last
batch of a stack to the full batch when a forward is given, so a stack needs one shape, the speed probe a few).
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch

__all__ = ["openvino_forward", "openvino_version", "OPENVINO_PRECISIONS"]

# Our precision names -> OpenVINO's INFERENCE_PRECISION_HINT
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def openvino_version() -> str | None:
    """OpenVINO's version, or None when it is not installed."""
    try:
        import openvino  # optional: only --backend openvino needs it
    except ImportError:
        return None
    return openvino.__version__


def openvino_forward(model: torch.nn.Module, precision: str, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``forward(batch) -> logits`` that runs ``model`` in OpenVINO on the CPU.

    Args:
        model: the UNet (or ensemble) in eval mode, on the CPU.
        precision: ``fp32`` or ``bf16`` (OpenVINO's inference precision; bf16 only where the CPU has it).
        threads: CPU threads OpenVINO may use (the same as torch's).

    Returns:
        The forward: float32 logits ``(B, K, h, w)`` as a torch tensor for a ``(B, C, H, W)`` float32 batch.

    Raises:
        ImportError: when OpenVINO is not installed (the caller says how to install it).
        ValueError: for a precision OpenVINO is not run with here.
    """
    import openvino as ov  # optional dependency: see the module docstring

    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(OPENVINO_PRECISIONS)}, got {precision!r}")
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": int(threads)}
    compiled: dict[tuple[int, ...], object] = {}

    def forward(batch: torch.Tensor) -> torch.Tensor:
        shape = tuple(batch.shape)
        if shape not in compiled:
            # The predictor calls this under torch's autocast; OpenVINO applies its own precision to the
            # float32 graph, so the graph is traced without autocast's casts.
            with torch.no_grad(), torch.autocast("cpu", enabled=False), warnings.catch_warnings():
                # tracing's notes (sizes taken as constants: right for one fixed shape; jit.trace deprecated)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", FutureWarning)
                converted = ov.convert_model(model, example_input=torch.zeros(shape))
            compiled[shape] = core.compile_model(converted, "CPU", config).create_infer_request()
        out = compiled[shape].infer({0: np.ascontiguousarray(batch.detach().float().contiguous().numpy())})[0]
        return torch.from_numpy(np.array(out, dtype=np.float32))
    return forward
