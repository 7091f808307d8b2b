"""What one checkpoint costs: the learner's `save_checkpoint` (LoRA in the diffusers format,
optimizer, stat tracker, RNG, trained batch ids; written aside, fsynced, renamed) timed on the
digits default and on a LoRA of Stable Diffusion 1.5's shapes. Prints one JSON object.

    python bench/checkpoint_cost.py [--repeats 5] [--dir runs] [--epochs 200]

- `digits`: the learner of configs/digits.yaml as `ddpo train` builds it (the embedded model).
- `sd15`: configs/sd15_aesthetic.yaml's LoRA (rank 4 on to_q/to_k/to_v/to_out.0) on SD 1.5's
  UNet, built from its config on the meta device (no weights, no download); only the LoRA is
  materialised, on CPU, as the learner holds it (float32).
Both carry the state of a run `--epochs` epochs in: Adam's moments for every LoRA weight, full
per-prompt reward buffers, every trained batch id. The checkpoints go to `--dir` (the disk the
runs go to; removed afterwards). `overhead` is the share of wall time a checkpoint every
`interval_s` seconds costs, cost / interval, an upper bound: the driver waits for the write
while the samplers already sample the next epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the digits pipeline's loading bars

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cluster.cli import embedded_config  # noqa: E402
from ddpo.advantages import PerPromptStatTracker  # noqa: E402
from ddpo.config import Config, load_config  # noqa: E402
from ddpo.lora import attach_lora, lora_parameters  # noqa: E402
from ddpo.plan import epoch_plan  # noqa: E402
from learner import Learner  # noqa: E402

INTERVALS_S = [60, 300, 600, 1800]

# SD 1.5's UNet (stable-diffusion-v1-5 unet/config.json): diffusers' UNet2DConditionModel defaults
# but for the text encoder's width
SD15_UNET = {"cross_attention_dim": 768}


def sd15_learner(config: Config) -> Learner:
    """A Learner holding a LoRA of SD 1.5's UNet shapes, without the pipeline: the UNet on the
    meta device, its LoRA layers materialised on CPU."""
    from diffusers import UNet2DConditionModel

    from ddpo.families import family_named

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    attach_lora(unet, config.lora.rank, config.lora.alpha, config.lora.target_modules, seed=config.seed)
    for module in unet.modules():
        if type(module).__name__ == "Linear" and any(p.requires_grad for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu")
            torch.nn.init.normal_(module.weight, std=1 / config.lora.rank)
    learner = Learner.__new__(Learner)
    learner.config, learner.rank, learner.world_size = config, 0, 1
    learner.model = family_named("StableDiffusionPipeline")(SimpleNamespace(unet=unet))
    t = config.train
    learner.optimizer = torch.optim.AdamW(lora_parameters(unet), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                          weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    learner.stat_tracker = PerPromptStatTracker(config.advantage.buffer_size, config.advantage.min_count)
    learner.generator = torch.Generator().manual_seed(config.seed + 1)
    learner.policy_version, learner.trained_batch_ids = 0, set()
    return learner


def run_state(learner: Learner, epochs: int) -> None:
    """The learner's state `epochs` epochs into a run: one optimizer step (Adam's moments for every
    LoRA weight), full reward buffers, the batch ids of every epoch."""
    config = learner.config
    params = lora_parameters(learner.model.denoiser)
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    learner.optimizer.step()
    learner.optimizer.zero_grad()
    prompts = config.load_prompts()
    rng = np.random.default_rng(0)
    learner.stat_tracker.update([p for p in prompts for _ in range(config.advantage.buffer_size)],
                                rng.random(len(prompts) * config.advantage.buffer_size))
    learner.trained_batch_ids = {spec.batch_id for epoch in range(epochs)
                                 for spec in epoch_plan(config, prompts, epoch)}
    learner.policy_version = epochs


def time_checkpoints(learner: Learner, root: Path, repeats: int) -> dict:
    seconds = []
    for _ in range(repeats):
        learner.policy_version += 1  # a new checkpoint each time (one that exists is kept as it is)
        start = time.perf_counter()
        directory = learner.save_checkpoint(root)
        seconds.append(time.perf_counter() - start)
    files = {path.name: path.stat().st_size for path in sorted(directory.iterdir())}
    params = lora_parameters(learner.model.denoiser)
    median = statistics.median(seconds)
    return {
        "lora_params": sum(p.numel() for p in params),
        "lora_rank": learner.config.lora.rank,
        "checkpoint_bytes": sum(files.values()),
        "files": files,
        "save_s_median": round(median, 4),
        "save_s_min": round(min(seconds), 4),
        "save_s_max": round(max(seconds), 4),
        "overhead_at_interval_s": {str(s): round(median / s, 6) for s in INTERVALS_S},
    }


def cpu_model() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.machine()


def filesystem(path: Path) -> str:
    """The type of the filesystem `path` is on (Linux), else ''."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    path = str(path.resolve())
    best = max((m for m in mounts if path == m[1] or path.startswith(m[1].rstrip("/") + "/")),
               key=lambda m: len(m[1]), default=None)
    return best[2] if best else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="runs", help="where the checkpoints are written (default runs/)")
    parser.add_argument("--epochs", type=int, default=200, help="epochs of the run whose state is saved")
    args = parser.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="checkpoint-cost-", dir=args.dir))
    results = {}
    try:
        digits = load_config(embedded_config("digits.yaml"))
        learner = Learner(digits)
        run_state(learner, args.epochs)
        results["digits"] = time_checkpoints(learner, scratch / "digits", args.repeats)
        sd15 = load_config(embedded_config("sd15_aesthetic.yaml"))
        learner = sd15_learner(sd15)
        run_state(learner, args.epochs)
        results["sd15"] = time_checkpoints(learner, scratch / "sd15", args.repeats)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({
        "repeats": args.repeats, "epochs_of_state": args.epochs,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "dir": str(Path(args.dir).resolve()), "filesystem": filesystem(Path(args.dir))},
        **results,
    }, indent=1))


if __name__ == "__main__":
    main()
