"""What an actor uses: its memory, and the denoiser's FLOPs for the MFU.

MFU (model FLOPs utilization) = the denoiser's model FLOPs / (wall seconds x devices x the
device's peak). The FLOPs of a forward are counted once per input shape with
`torch.utils.flop_counter.FlopCounterMode` and added up per call. A training forward counts 2x its
forward FLOPs: with the base frozen, the backward computes the inputs' gradients (the forward's
matmuls again, transposed) and the small LoRA weights' gradients; recomputation under gradient
checkpointing is not counted (it is not model work). The peak is the device's dense bfloat16
tensor-core peak from `PEAK_BF16_FLOPS`, so the MFU is given for bfloat16/float16 models on a GPU
listed there, and is None elsewhere (a CPU, float32, an unknown GPU).
"""

from __future__ import annotations

import os

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

# dense bfloat16 tensor-core FLOP/s (no sparsity), from the vendors' data sheets; the first name
# found in `torch.cuda.get_device_name()` counts, so the more specific names come first
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12, "GH200": 989e12,
    "B200": 2250e12, "B100": 1750e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12,
    "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 6000 Ada": 364e12,
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for the model's dtype, or None where it is not known."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def memory_bytes() -> dict[str, int]:
    """This process's resident memory and, where it has used a GPU, the bytes its tensors hold
    there now and at most since it started (torch's caching allocator's count)."""
    usage = {"rss_bytes": psutil.Process(os.getpid()).memory_info().rss, "gpu_bytes": 0, "gpu_peak_bytes": 0}
    if torch.cuda.is_initialized():
        usage["gpu_bytes"] = torch.cuda.memory_allocated()
        usage["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return usage


class FlopMeter:
    """Counts the model FLOPs of a module's forward calls (see the module docstring): `total`
    grows by each call's count; a shape's first call runs under a FlopCounterMode."""

    def __init__(self, module: torch.nn.Module):
        self.total = 0.0
        self.per_shape: dict[tuple, int] = {}
        self._counting: tuple[tuple, FlopCounterMode] | None = None
        module.register_forward_pre_hook(self._before, with_kwargs=True)
        module.register_forward_hook(self._after, with_kwargs=True)

    @staticmethod
    def _shapes(args, kwargs) -> tuple:
        values = list(args) + [kwargs[k] for k in sorted(kwargs)]
        return tuple((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None for v in values)

    def _before(self, module, args, kwargs):
        if self._counting is not None:  # the forward that began counting raised: stop counting
            self._counting[1].__exit__(None, None, None)
            self._counting = None
        key = self._shapes(args, kwargs)
        if key not in self.per_shape:
            mode = FlopCounterMode(display=False)
            mode.__enter__()
            self._counting = (key, mode)

    def _after(self, module, args, kwargs, output):
        key = self._shapes(args, kwargs)
        if self._counting is not None and self._counting[0] == key:
            mode = self._counting[1]
            mode.__exit__(None, None, None)
            self.per_shape[key] = mode.get_total_flops()
            self._counting = None
        self.total += self.per_shape.get(key, 0) * (2 if torch.is_grad_enabled() else 1)
