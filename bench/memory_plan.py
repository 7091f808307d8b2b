"""Calibration of the memory plan (ddpo/memory.py, `ddpo plan`) against peaks measured on the CPU.

    python bench/memory_plan.py [--cases tiny/sampling,sd15/training,...]

Prints one JSON object: per case, the plan's figure (from the meta device, nothing loaded), the
measured peak, and the relative error (plan / measured - 1). Cases: the tiny default's shapes
(builtin:tiny as configs/tiny.yaml: 32x32, CFG doubling the batch of 8) and a Stable-Diffusion-1.5-
shaped UNet and VAE with random weights (the shipped SD 1.5 configs) at 256 px, float32: a
sampling forward (no grad), a training forward + backward (LoRA rank 4 trainable, the base
frozen), the same with gradient checkpointing, and a VAE decode.

Seen on this machine's CPU: within 6% everywhere except a small sampling forward (SD 1.5 at
256 px, batch 2: 65 MiB of activations), where the CPU convolution's weight reordering (about one
large conv weight, ~64 MiB, transient) is the peak; at batch 8 the plan is within 0.1%.

How a peak is measured: each case runs in a fresh Python process (`--measure CASE`), which builds
its model, runs the step once to warm up (libraries, thread pools, kernel caches), then resets the
kernel's peak-RSS mark (`/proc/self/clear_refs` 5), makes the inputs, runs the step, and reports
VmHWM - VmRSS before: the bytes the step added at its peak. glibc's malloc is held to mmap every
allocation of 64 KiB and more (MALLOC_MMAP_THRESHOLD_), so that freed tensors go back to the kernel
at once as the CUDA caching allocator's frees do within it; what RSS adds beyond live tensors (page
rounding, allocator bookkeeping, oneDNN scratch) counts against the plan. The plan's training
figure leaves out the LoRA's gradients (they are its trainable bytes); the measured peak holds
them, so they are added to the plan's figure here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# case -> (model, step, latent batch, image size)
CASES = {
    "tiny/sampling": ("builtin:tiny", "sampling", 16, 32),
    "tiny/training": ("builtin:tiny", "training", 16, 32),
    "tiny/training_checkpointed": ("builtin:tiny", "training_checkpointed", 16, 32),
    "tiny/decode": ("builtin:tiny", "decode", 8, 32),
    "sd15/sampling": (SD15, "sampling", 2, 256),
    "sd15/sampling_batch8": (SD15, "sampling", 8, 256),
    "sd15/training": (SD15, "training", 2, 256),
    "sd15/training_checkpointed": (SD15, "training_checkpointed", 2, 256),
    "sd15/decode": (SD15, "decode", 2, 256),
}
# what a plain run measures (about 3 min on 2 cores); the others by --cases
DEFAULT_CASES = ["tiny/sampling", "tiny/training", "sd15/sampling", "sd15/sampling_batch8", "sd15/training",
                 "sd15/training_checkpointed", "sd15/decode"]
LORA_RANK, LORA_TARGETS = 4, ("to_q", "to_k", "to_v", "to_out.0")


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _shapes(model, size: int):
    from ddpo.memory import Shapes, latent_channels, text_tokens, vae_scale_factor

    scale = vae_scale_factor(model)
    return Shapes(latent_channels(model), size // scale, size // scale, text_tokens(model, "", None))


def planned(case: str) -> int:
    """The plan's figure for a case, from the meta device."""
    from ddpo.memory import decode_bytes, meta_model, sampling_bytes, training_bytes

    pretrained, step, batch, size = CASES[case]
    model = meta_model(pretrained, None, "float32", LORA_RANK, float(LORA_RANK), LORA_TARGETS)
    shapes = _shapes(model, size)
    if step == "sampling":
        return sampling_bytes(model.family, model.denoiser, batch, shapes)
    if step == "decode":
        return decode_bytes(model.family, model.vae, batch, shapes)
    lora_gradients = 4 * model.lora_params
    return training_bytes(model.family, model.denoiser, batch, shapes, step == "training_checkpointed") + lora_gradients


def _real_model(pretrained: str):
    """The case's denoiser (LoRA attached) and VAE with random weights, on the CPU."""
    import torch

    from ddpo.lora import attach_lora
    from ddpo.memory import meta_model

    meta = meta_model(pretrained, None, "float32", LORA_RANK, float(LORA_RANK), LORA_TARGETS)
    modules = {}
    for name in (meta.denoiser_name, meta.vae_name):
        template = meta.modules[name]
        config = {k: v for k, v in template.config.items() if not k.startswith("_")}
        with torch.device("meta"):
            module = type(template).from_config(config)
        module = module.to_empty(device="cpu")
        with torch.no_grad():  # small random weights: values do not change the memory, NaNs could slow it
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.is_floating_point():
                    tensor.normal_(0, 0.02)
        module.requires_grad_(False)
        module.eval()
        modules[name] = module
    denoiser, vae = modules[meta.denoiser_name], modules[meta.vae_name]
    attach_lora(denoiser, LORA_RANK, float(LORA_RANK), list(LORA_TARGETS), seed=0)
    return meta, denoiser, vae


def measure(case: str) -> int:
    """The step's peak bytes above what was there before it (in this fresh process)."""
    import torch
    from torch.utils._pytree import tree_map

    from ddpo.memory import _denoiser_inputs, latent_channels

    torch.manual_seed(0)
    pretrained, step, batch, size = CASES[case]
    meta, denoiser, vae = _real_model(pretrained)
    shapes = _shapes(meta, size)

    def inputs():
        if step == "decode":
            return {"z": torch.randn(batch, latent_channels(meta), shapes.latent_height, shapes.latent_width)}
        return tree_map(lambda t: torch.randn(t.shape).to(t.dtype) if isinstance(t, torch.Tensor) else t,
                        _denoiser_inputs(meta.family, denoiser, batch, shapes))

    def run():
        kwargs = inputs()
        if step == "decode":
            with torch.no_grad():
                out = vae.decode(kwargs["z"]).sample
        elif step == "sampling":
            with torch.no_grad():
                out = denoiser(**kwargs).sample
        else:
            out = denoiser(**kwargs).sample
            out.float().sum().backward()
        return out

    if step == "training_checkpointed":
        denoiser.enable_gradient_checkpointing()
    if step.startswith("training"):
        denoiser.train()
    run()  # warm-up
    for param in denoiser.parameters():
        param.grad = None
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS mark back to the present RSS
    before = _status("VmRSS")
    out = run()  # noqa: F841 (held, as the plan's trace holds the output)
    return _status("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated, of: " + ", ".join(CASES))
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # in the fresh process: one case
    args = parser.parse_args()
    if args.measure:
        print(json.dumps({"measured_bytes": measure(args.measure)}))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    results, start = {}, time.perf_counter()
    for case in args.cases.split(","):
        plan = planned(case)
        run = subprocess.run([sys.executable, __file__, "--measure", case], env=env, capture_output=True, text=True,
                             check=True)
        measured = json.loads(run.stdout.strip().splitlines()[-1])["measured_bytes"]
        results[case] = {"plan_mib": round(plan / 2**20, 2), "measured_mib": round(measured / 2**20, 2),
                         "relative_error": round(plan / measured - 1, 4)}
    print(json.dumps({"method": "peak RSS above the step's start, fresh process per case, "
                                "MALLOC_MMAP_THRESHOLD_=65536; float32 on the CPU",
                      "cases": results, "wall_s": round(time.perf_counter() - start, 1)}, indent=2))


if __name__ == "__main__":
    main()
