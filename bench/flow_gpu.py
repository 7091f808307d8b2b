"""Flow-GRPO on one GPU with an SD3.5-Medium-shaped pipeline of random weights: sampler images/s
against diffusers' own pipeline, learner samples/s, peak memory, and how far recomputed log-probs
drift from the stored ones in bfloat16 and float32. Prints one JSON object.

    python bench/flow_gpu.py --device cuda [--max-seconds 300] [--out flow_gpu.json]
    python bench/flow_gpu.py --tiny --device cpu     # the same code on test-sized parts (CI)

The pipeline is built in code, so nothing is downloaded: SD3.5 Medium's transformer
(stabilityai/stable-diffusion-3.5-medium transformer/config.json: patch_size 2, in/out_channels 16,
num_layers 24, attention_head_dim 64, num_attention_heads 24, joint_attention_dim 4096,
caption_projection_dim 1536, pooled_projection_dim 2048, pos_embed_max_size 384, sample_size 128,
qk_norm rms_norm, dual_attention_layers 0..12; about 2.2B parameters), SD3's VAE (16 latent channels,
8x down, blocks 128/256/512/512, no quant convs, shift 0.0609, scale 1.5305), two CLIP text
encoders with projection at the real widths (768 and 1280, projections 768 and 1280) but only 2
layers each (they run once per prompt), word-level tokenizers, no T5 (its 128 tokens are zeros, as
the pipeline does without it), FlowMatchEulerDiscreteScheduler(shift=3.0). It is built on the
device, cast to `--dtype`, saved to a scratch folder and loaded back through
`ddpo.pipeline.load_policy` / `Learner`, as a downloaded folder would be. The weights are random,
so the images mean nothing; the shapes, and so the time and memory, are the real model's.

Settings (configs/sd35_pickscore.yaml's): 512x512, 10 SDE steps, guidance 4.5 (CFG), noise_level 0.7,
128 T5 tokens, LoRA rank 32 / alpha 64 on the joint blocks' `attn.*` projections, DDPO-IS with
clip_range 1e-4, 9 of the 10 steps trained (timestep_fraction 0.99), CFG in training, KL to the reference 0.01 (one more
no-grad forward per step). Batches: sampler 8, learner minibatch 4 (halved on out-of-memory).

Phases, in order; each one's peak GPU memory is `torch.cuda.max_memory_allocated` since its start:
  build     the pipeline built, cast and saved (not timed as throughput)
  worker_sample  the colocated layout's one-model worker (`actors.worker.ColocatedWorker`: the
            sampler and the learner rank in one process, one pipeline) loaded, then
            `ColocatedWorker.sample` (Arrow out): one warm-up batch, then `--batches` timed batches
  worker_train  `train` on the timed batches (random rewards): one warm-up update, then one timed
            update (lag 0: no proximal recompute), on the same model. Then one device's epoch
            without the reward: images_per_device_s = the timed images / (their sampling + the
            update), and the MFU: the denoiser's FLOPs (`actors.usage.FlopMeter`, training counted
            as 2x forward) over that time x the GPU's dense bf16 peak. The worker's peak is
            `max_memory_allocated` from before its load to the end of its update
  plan      `ddpo.memory.plan_memory` of this config (what `ddpo plan` prints): its device total
            against the worker's measured peak (goal: within 15%)
  plain     `StableDiffusion3Pipeline.__call__` on the same prompts, seeds and settings
            (output_type "np": it decodes too), with the same LoRA attached (B = 0) and with it off
  ratio_bf16  the stored log-probs of the first timed batch's trajectories (`--ratio-samples`, default
            all 8) recomputed with `step_log_prob` in bfloat16, in minibatches of `--recompute-batch`
            samples (2: a shape other than the sampler's, as the learner's 4 is) with each sample's
            steps in a random order, as the learner does: |exp(lp_new - lp_stored) - 1|, max and mean
  ratio_fp32  the same pipeline cast to float32 (the same weights): the bfloat16 trajectories
            recomputed in float32, and float32-sampled trajectories (a batch of `--ratio-samples`)
            recomputed in float32; TF32 as torch's defaults (recorded under `settings`)
The SDE step and its log-prob always compute in float32 (ddpo/flow.py); what these numbers decide
is the dtype of the transformer's forward (`model.dtype`): bfloat16 is enough where its
|ratio - 1| stays well under train.clip_range (the JSON's `ratio_error.verdict`).

`--max-seconds` is checked before each phase: past it, the remaining phases are skipped and listed
under `skipped` (a phase that has started runs to its end). A phase that fails is listed under
`errors` and the next ones still run. With `--out`, the JSON is rewritten after every phase, so a
run cut short still leaves what it measured.

On the device machine (Python 3.12 with torch, transformers, peft, safetensors, pyyaml, pyarrow,
huggingface_hub and accelerate; no diffusers, no Ray, nothing imported here needs Ray), diffusers
travels as a wheel in .whl/ (ignored by .gitignore). Once, here, in the repository root:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1

Then one device call with carry [".whl"] and timeout_s 480 (the model's build and one load
included; the figures of a run are in the README):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv; \\
    PYTHONUNBUFFERED=1 python3 bench/flow_gpu.py --device cuda --max-seconds 300 --out $OUT/flow_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection  # noqa: E402

from actors.usage import FlopMeter, peak_flops  # noqa: E402
from actors.worker import ColocatedWorker  # noqa: E402
from ddpo.config import Config, load_config  # noqa: E402
from ddpo.rollout import Trajectories, sample_trajectories, step_log_prob  # noqa: E402
from ddpo.families import ModelFamily, PromptCache  # noqa: E402
from ddpo.lora import get_lora_state, load_lora_state, reference_policy  # noqa: E402
from ddpo.memory import plan_memory  # noqa: E402
from ddpo.pipeline import _TINY_VOCAB, word_level_tokenizer  # noqa: E402
from ddpo.trajectory import EpochTrajectories, TrainingBatch, to_training_batch  # noqa: E402

# -- the model, at two sizes ------------------------------------------------------------------


class Size(NamedTuple):
    transformer: dict
    vae: dict
    clip: tuple[dict, dict]  # text_encoder (CLIP-L's widths), text_encoder_2 (OpenCLIP bigG's)
    resolution: int
    sample_batch: int
    train_batch: int
    clip_layers: int = 2


# stabilityai/stable-diffusion-3.5-medium, transformer/config.json
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
# SD3 / SD3.5's vae/config.json
SD3_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    norm_num_groups=32, act_fn="silu", sample_size=1024, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)

SIZES = {
    "sd35_medium": Size(
        transformer=SD35_MEDIUM_TRANSFORMER, vae=SD3_VAE,
        clip=(dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
                   hidden_act="quick_gelu"),
              dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280,
                   hidden_act="gelu")),
        resolution=512, sample_batch=8, train_batch=4),
    # tests/tiny_families.build_tiny_sd3's sizes, with SD3.5's qk_norm and a dual-attention block
    "tiny": Size(
        transformer=dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                         attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                         caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
                         qk_norm="rms_norm", dual_attention_layers=(0,)),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=1.5305, shift_factor=0.0609),
        clip=(dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32),) * 2,
        resolution=32, sample_batch=4, train_batch=2),
}

# prompts the word-level tokenizer knows every word of
PROMPTS = ["a cat riding a bike", "a dog playing chess", "a horse washing dishes", "a red bird on a big tree",
           "a small blue fish", "a painting of a black bear", "a white rabbit with a fox", "a photo of a green cow"]


def build_pipeline(size: Size, device: torch.device, dtype: torch.dtype, seed: int = 0) -> StableDiffusion3Pipeline:
    """The SD3 pipeline of `size` with random weights, built on `device` (fast initialisation on
    a GPU) and cast to `dtype` one module at a time."""
    torch.manual_seed(seed)
    tokenizer = word_level_tokenizer(_TINY_VOCAB)

    def clip(widths: dict) -> CLIPTextModelWithProjection:
        config = CLIPTextConfig(vocab_size=len(tokenizer), num_hidden_layers=size.clip_layers,
                                max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **widths)
        return CLIPTextModelWithProjection(config).to(dtype)

    with torch.device(device):
        transformer = SD3Transformer2DModel(**size.transformer).to(dtype)
        vae = AutoencoderKL(**size.vae).to(dtype)
        text_encoder, text_encoder_2 = clip(size.clip[0]), clip(size.clip[1])
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)  # no T5: its tokens are zeros


# configs/sd35_pickscore.yaml's, Flow-GRPO's: not the second self-attention (attn2) of SD3.5's
# dual-attention blocks, which the family default would take too
LORA_TARGETS = ("[attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, attn.add_q_proj, attn.add_k_proj, "
                "attn.add_v_proj, attn.to_add_out]")


def bench_config(args, size: Size, folder: str, output_dir: str, dtype: str | None = None,
                 train_batch: int | None = None, gradient_checkpointing: bool = False) -> Config:
    """configs/sd35_pickscore.yaml's sampling and training settings on one GPU."""
    settings = {
        "model.pretrained": folder, "model.dtype": dtype or args.dtype, "model.device": args.device,
        "model.max_sequence_length": 128,
        "lora.rank": args.lora_rank, "lora.alpha": args.lora_alpha, "lora.target_modules": LORA_TARGETS,
        "sample.num_steps": args.steps, "sample.guidance_scale": args.guidance_scale,
        "sample.flow.noise_level": args.noise_level, "sample.height": size.resolution, "sample.width": size.resolution,
        "sample.batch_size": args.sample_batch, "sample.num_batches_per_epoch": args.batches,
        "sample.log_prob_reduction": "mean",
        "train.algorithm": "ddpo_is", "train.batch_size": train_batch or args.train_batch,
        "train.learning_rate": 3e-4, "train.timestep_fraction": 0.99, "train.cfg": True,
        "train.clip_range": args.clip_range, "train.kl_coef": args.kl_coef,
        "train.gradient_checkpointing": gradient_checkpointing,
        "advantage.mode": "batch", "eval_images": 0, "output_dir": output_dir, "seed": args.seed,
    }
    return load_config(None, [f"{key}={value}" for key, value in settings.items()] + args.set)


# -- measuring --------------------------------------------------------------------------------


def lag0_epoch(batches: list, tag: str, policy_version: int,
               rewards: np.random.Generator) -> tuple[EpochTrajectories, list[np.ndarray]]:
    """The sampled batches as a new epoch for `train`: ids `<tag>-<i>` (never trained on yet),
    tagged with the learner's current version (lag 0: no proximal recompute), random rewards."""
    tagged = [b.set_column(b.schema.get_field_index("policy_version"), "policy_version",
                           pa.array([policy_version] * b.num_rows, pa.int64()))
              .set_column(b.schema.get_field_index("batch_id"), "batch_id", pa.array([f"{tag}-{i}"] * b.num_rows))
              for i, b in enumerate(batches)]
    return EpochTrajectories.from_batches(tagged), [rewards.normal(size=b.num_rows) for b in tagged]


def compare_plan(config: Config, measured_gib: float | None) -> dict:
    """`ddpo plan`'s figures for `config` (one colocated device), and the relative errors (GPU
    only) against a measured peak of its peak, and of its training side alone (what the device
    holds while it trains: weights, LoRA and Adam state, prompt rows, the training activations)
    for a measurement of an update alone."""
    d = plan_memory(config).devices[0]
    compared = {"plan": d.to_json()}
    if measured_gib:
        planned = d.peak_bytes / 2**30
        training = (d.weights_bytes + d.trainable_bytes + d.prompt_cache_bytes + d.training_bytes) / 2**30
        compared.update(planned_gib=planned, measured_peak_gib=measured_gib,
                        error=(planned - measured_gib) / measured_gib, training_side_gib=training,
                        training_side_error=(training - measured_gib) / measured_gib)
    return compared


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> float | None:
    """Start a phase's peak; returns the GiB allocated now (the weights it starts with)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def batch_inputs(index: int, batch_size: int) -> tuple[list[str], list[int]]:
    """Batch `index`'s prompts (cycling through PROMPTS) and seeds (all distinct)."""
    rows = range(index * batch_size, (index + 1) * batch_size)
    return [PROMPTS[i % len(PROMPTS)] for i in rows], [1000 + i for i in rows]


def timed_batches(run, num_batches: int, batch_size: int, device: torch.device,
                  warm_up: bool = True) -> tuple[list, list[float]]:
    """One warm-up batch (index 0), then `num_batches` timed ones (1..n): outputs and seconds."""
    if warm_up:
        run(*batch_inputs(0, batch_size))
    outputs, seconds = [], []
    for index in range(1, num_batches + 1):
        synchronize(device)
        start = time.perf_counter()
        outputs.append(run(*batch_inputs(index, batch_size)))
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return outputs, seconds


def first_rows(batch, n: int) -> TrainingBatch:
    """The first `n` trajectories of a sample batch (Arrow), as the learner reads them."""
    return to_training_batch(batch.slice(0, n))


@torch.no_grad()
def recompute_log_probs(model: ModelFamily, trajectories: Trajectories | TrainingBatch, config: Config, batch_size: int,
                        seed: int = 0) -> torch.Tensor:
    """Every stored step's log-prob [B, T] under the model's current weights and dtype, as the
    learner computes it: minibatches of `batch_size` samples, conditioning encoded per minibatch,
    one forward per step position with each sample's steps in its own random order."""
    s, device = config.sample, model.device
    model.set_timesteps(s.num_steps, s.height, s.width)
    num_samples, num_steps = trajectories.log_probs.shape
    generator = torch.Generator().manual_seed(seed)
    log_probs = torch.empty(num_samples, num_steps, dtype=torch.float32)
    for start in range(0, num_samples, batch_size):
        rows = torch.arange(start, min(start + batch_size, num_samples))
        cond, negative = model.encode([trajectories.prompts[i] for i in rows], model.uses_cfg(s.guidance_scale))
        order = torch.stack([torch.randperm(num_steps, generator=generator) for _ in rows])
        for j in range(num_steps):
            steps = order[:, j]
            step = step_log_prob(model, trajectories.latents[rows, steps].to(device),
                                 trajectories.latents[rows, steps + 1].to(device),
                                 trajectories.timesteps[rows, steps].to(device), cond, negative, s)
            log_probs[rows, steps] = step.log_prob.float().cpu()
    return log_probs


def ratio_error(recomputed: torch.Tensor, stored: torch.Tensor, clip_range: float) -> dict:
    """|exp(lp_recomputed - lp_stored) - 1| over every (sample, step): max, mean, per step's max,
    and the fraction above the PPO clip range (what the noise alone would clip)."""
    error = torch.expm1(recomputed.double() - stored.double()).abs()
    return {"max": float(error.max()), "mean": float(error.mean()),
            "per_step_max": [float(v) for v in error.max(dim=0).values],
            "fraction_above_clip_range": float((error > clip_range).double().mean())}


def dtype_verdict(errors: dict, clip_range: float) -> str:
    """Which dtype the transformer's forward needs, from the recompute errors."""
    bf16 = errors.get("bf16_sampled_bf16_recomputed", {}).get("max")
    fp32 = errors.get("fp32_sampled_fp32_recomputed", {}).get("max")
    if bf16 is None or not math.isfinite(bf16):
        return "not measured"
    if bf16 < 0.1 * clip_range:
        return (f"bfloat16 forward is enough: max |ratio - 1| {bf16:.2e} is under a tenth of "
                f"train.clip_range {clip_range:g}")
    other = f"; float32 gives {fp32:.2e}" if fp32 is not None else ""
    where = "under" if bf16 < clip_range else "over"
    return (f"bfloat16 recompute noise (max |ratio - 1| {bf16:.2e}) is {where} train.clip_range {clip_range:g} "
            f"but not far below it{other}: sample and train with a float32 forward, or widen train.clip_range "
            f"well above the bfloat16 noise")


def trajectory_stats(trajectories: TrainingBatch) -> dict:
    """Sizes of the random model's latents and log-probs, to judge the ratio errors by."""
    latents, log_probs = trajectories.latents.float(), trajectories.log_probs
    return {"x_T_std": float(latents[:, 0].std()), "x_0_std": float(latents[:, -1].std()),
            "x_0_finite": bool(torch.isfinite(latents[:, -1]).all()),
            **({} if log_probs is None else {  # none: an ODE sample (DiffusionNFT)
                "log_prob_mean": float(log_probs.mean()),
                "log_prob_per_step_mean": [float(v) for v in log_probs.mean(dim=0)]})}


# -- phases -----------------------------------------------------------------------------------


class Phases:
    """Runs the phases in order under the time guard, recording skips, errors and seconds, and
    rewriting the JSON (`out`) after each one."""

    def __init__(self, result: dict, max_seconds: float, out: str | None, skip: list[str] = ()):
        self.result, self.max_seconds, self.out, self.skip = result, max_seconds, out, set(skip)
        self.start = time.perf_counter()

    def run(self, name: str, phase, *needs):
        if name in self.skip:
            self.result["skipped"][name] = "--skip"
            return None
        if any(need is None for need in needs):
            self.result["skipped"][name] = "an earlier phase it needs did not finish"
            return None
        elapsed = time.perf_counter() - self.start
        if elapsed > self.max_seconds:
            self.result["skipped"][name] = f"time guard: {elapsed:.0f} s > --max-seconds {self.max_seconds:g}"
            return None
        start = time.perf_counter()
        try:
            value = phase()
        except Exception as err:  # any failure: record it, go on with the phases that don't need it
            traceback.print_exc(file=sys.stderr)
            message = str(err).strip()
            self.result["errors"][name] = f"{type(err).__name__}: {message.splitlines()[0][:300] if message else ''}"
            value = None
        self.result["phase_s"][name] = time.perf_counter() - start
        self.result["elapsed_s"] = time.perf_counter() - self.start
        self.write()
        return value

    def write(self) -> None:
        if self.out:
            Path(self.out).write_text(json.dumps(self.result, indent=2))


def versions() -> dict:
    import diffusers
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.version.cuda}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def scratch_root(device: torch.device, workdir: str | None) -> str | None:
    """Where the built weights go: `--workdir`, else /dev/shm (memory) when it has room, else the
    system's temp folder."""
    if workdir:
        return workdir
    shm = Path("/dev/shm")
    if device.type == "cuda" and shm.is_dir() and shutil.disk_usage(shm).free > 24 * 2**30:
        return str(shm)
    return None


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="test-sized parts (CPU, seconds), the same code")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--lora-alpha", type=float, default=64.0)
    parser.add_argument("--clip-range", type=float, default=1e-4)
    parser.add_argument("--kl-coef", type=float, default=0.01)
    parser.add_argument("--sample-batch", type=int, help="images per sampler batch (8; tiny 4)")
    parser.add_argument("--batches", type=int, default=2, help="timed sampler batches, also the learner's epoch")
    parser.add_argument("--train-batch", type=int, help="learner minibatch (4; tiny 2), halved on out-of-memory")
    parser.add_argument("--ratio-samples", type=int,
                        help="trajectories per recompute measurement (default: a sampler batch)")
    parser.add_argument("--recompute-batch", type=int, default=2,
                        help="samples per recompute forward (not the sampler's batch, as in the learner)")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--out", help="also write the JSON here, after every phase")
    parser.add_argument("--workdir", help="scratch folder for the built weights (default: /dev/shm or temp)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override after the settings above (another method: an SDE window, "
                             "DiffusionNFT, ...), repeatable")
    parser.add_argument("--skip", nargs="*", default=[], metavar="PHASE", help="phases not to run")
    parser.add_argument("--replan", metavar="JSON",
                        help="no run: plan a run's model again (its saved folder configs) against its measured peaks")
    args = parser.parse_args(argv)
    size = SIZES["tiny" if args.tiny else "sd35_medium"]
    args.sample_batch = args.sample_batch or size.sample_batch
    args.train_batch = args.train_batch or size.train_batch
    args.ratio_samples = min(args.ratio_samples or args.sample_batch, args.sample_batch)
    return args, size


def replan(args, size: Size) -> dict:
    """`--replan`: the memory plans of an earlier run (its JSON), made again by today's planner
    from the model configs it saved, against the peaks it measured (for a planner that changed
    since, without a GPU)."""
    earlier = json.loads(Path(args.replan).read_text())
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "sd35"
        for name, content in earlier["model"]["folder_configs"].items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(content))
        result = {phase: compare_plan(bench_config(args, size, str(folder), scratch, gradient_checkpointing=checkpointed),
                                      earlier[phase]["measured_peak_gib"])
                  for phase, checkpointed in (("plan", False), ("plan_checkpointed", True))}
    print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    args, size = parse_args(argv)
    if args.replan:
        return replan(args, size)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, size)
    finally:
        torch.set_num_threads(threads)  # as it was (a test calls main in-process)


def run(args, size: Size) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    result = {
        "device": device_name(device), "versions": versions(),
        "settings": {"model": "tiny" if args.tiny else "sd35_medium (random weights)",
                     "resolution": size.resolution, "num_steps": args.steps, "guidance_scale": args.guidance_scale,
                     "noise_level": args.noise_level, "dtype": args.dtype, "lora_rank": args.lora_rank,
                     "lora_alpha": args.lora_alpha, "sample_batch": args.sample_batch, "timed_batches": args.batches,
                     "train_batch": args.train_batch, "steps_trained": max(1, int(args.steps * 0.99)),
                     "kl_coef": args.kl_coef, "clip_range": args.clip_range, "ratio_samples": args.ratio_samples,
                     "recompute_batch": args.recompute_batch, "text_encoders": f"2 CLIP, {size.clip_layers} layers, no T5",
                     "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                     "tf32_cudnn": torch.backends.cudnn.allow_tf32, "overrides": args.set},
        "skipped": {}, "errors": {}, "phase_s": {},
    }
    phases = Phases(result, args.max_seconds, args.out, args.skip)
    state: dict = {}
    with tempfile.TemporaryDirectory(prefix="flow_gpu_", dir=scratch_root(device, args.workdir)) as scratch:
        folder, output_dir = str(Path(scratch) / "sd35"), str(Path(scratch) / "runs")
        config = bench_config(args, size, folder, output_dir)

        def build():
            start = time.perf_counter()
            pipe = build_pipeline(size, device, dtype, args.seed)
            synchronize(device)
            built = time.perf_counter() - start
            transformer = pipe.transformer
            result["model"] = {
                "transformer_params": sum(p.numel() for p in transformer.parameters()),
                "transformer_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in size.transformer.items()},
                "text_encoder_params": sum(p.numel() for m in (pipe.text_encoder, pipe.text_encoder_2)
                                           for p in m.parameters()),
                "vae_params": sum(p.numel() for p in pipe.vae.parameters()),
            }
            start = time.perf_counter()
            pipe.save_pretrained(folder)
            result["build"] = {"build_s": built, "save_s": time.perf_counter() - start,
                               "folder_gib": sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 2**30}
            # the folder's configs (no weights): what `ddpo plan` reads, to plan this model again elsewhere
            result["model"]["folder_configs"] = {str(f.relative_to(folder)): json.loads(f.read_text())
                                                 for f in sorted(Path(folder).rglob("*.json"))
                                                 if not f.name.endswith(".index.json")}
            del pipe, transformer
            free_memory(device)
            return True

        def worker_sample():
            """The colocated layout's one-model worker (sampler and learner rank in one process):
            a warm-up batch, then the timed batches, through `ColocatedWorker.sample` (Arrow out)."""
            reset_peak(device)  # the worker's peak, from its load to the end of its update
            start = time.perf_counter()
            worker = ColocatedWorker(config)
            load_s = time.perf_counter() - start
            meter = FlopMeter(worker.model.denoiser)
            resident = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
            sample = lambda prompts, seeds: worker.sample(f"batch-{seeds[0]}", prompts, seeds)[0]  # noqa: E731
            worker.sample("warm-up", *batch_inputs(0, args.sample_batch))
            flops = meter.total
            batches, seconds = timed_batches(sample, args.batches, args.sample_batch, device, warm_up=False)
            result["sampler"] = {"images_per_s": args.batches * args.sample_batch / sum(seconds), "batch_s": seconds,
                                 "load_s": load_s, "resident_gib": resident, "peak_gib": peak_gib(device),
                                 "flops": meter.total - flops}
            result["trajectories"] = trajectory_stats(first_rows(batches[0], args.sample_batch))
            state.update(worker=worker, model=worker.model, batches=batches, meter=meter,
                         sampled_weights=get_lora_state(worker.model.denoiser))
            return True

        def worker_train():
            """One warm-up update, then one timed update, on the timed batches (random rewards),
            on the same model; the train batch halves on out-of-memory."""
            worker, meter = state["worker"], state["meter"]
            rewards = np.random.default_rng(args.seed)
            out_of_memory = []

            def epoch(tag: str) -> tuple[EpochTrajectories, list[np.ndarray]]:
                return lag0_epoch(state["batches"], tag, worker.policy_version, rewards)

            while True:
                try:
                    warm_up = worker.train(*epoch("warm-up"))
                    break
                except torch.cuda.OutOfMemoryError:
                    out_of_memory.append(worker.config.train.batch_size)
                    if worker.config.train.batch_size == 1:
                        raise
                    worker.optimizer.zero_grad(set_to_none=True)
                    worker.config.train.batch_size //= 2
                    free_memory(device)
            timed_epoch = epoch("timed")
            flops = meter.total
            synchronize(device)
            start = time.perf_counter()
            metrics = worker.train(*timed_epoch)
            synchronize(device)
            seconds = time.perf_counter() - start
            diagnostics = ("loss", "approx_kl", "clipfrac", "kl_ref", "grad_norm", "time_proximal_s")
            steps_trained = max(1, int(worker.num_steps * config.train.timestep_fraction))  # of the stored (or, NFT, all)
            train_batch = worker.config.train.batch_size
            result["learner"] = {
                "samples_per_s": metrics["num_samples"] / seconds, "update_s": seconds,
                "num_samples": metrics["num_samples"], "train_batch": train_batch, "steps_trained": steps_trained,
                "forward_backward_per_update": math.ceil(metrics["num_samples"] / train_batch) * steps_trained,
                "flops": meter.total - flops, "out_of_memory_at_train_batch": out_of_memory,
                "warm_up": {k: warm_up[k] for k in diagnostics if k in warm_up},
                "timed": {k: metrics[k] for k in diagnostics if k in metrics}}
            # one device's epoch without the reward: the timed batches sampled, then trained on
            epoch_s = sum(result["sampler"]["batch_s"]) + seconds
            peak = peak_flops(device, worker.model.denoiser.dtype)
            result["worker"] = {
                "images_per_device_s": args.batches * args.sample_batch / epoch_s, "epoch_s": epoch_s,
                "mfu": (result["sampler"]["flops"] + result["learner"]["flops"]) / (epoch_s * peak) if peak else None,
                "mfu_sampling": result["sampler"]["flops"] / (sum(result["sampler"]["batch_s"]) * peak) if peak else None,
                "mfu_training": result["learner"]["flops"] / (seconds * peak) if peak else None,
                "peak_flops": peak, "peak_gib": peak_gib(device),
                "note": "one device, sample + one update on the same images, no reward model; FLOPs counted by "
                        "actors.usage.FlopMeter (training: 2x forward)"}
            load_lora_state(worker.model.denoiser, state["sampled_weights"])  # back to the sampling weights
            return True

        def plan():
            """The memory plan for this config (`ddpo plan`) against the worker's measured peak;
            then one more update with `train.gradient_checkpointing` on, its peak against the
            plan of that config (the worker's weights, LoRA, Adam state and prompt rows stay)."""
            worker = state["worker"]
            result["plan"] = compare_plan(config, result["worker"]["peak_gib"])
            checkpointed = bench_config(args, size, folder, output_dir, train_batch=worker.config.train.batch_size,
                                        gradient_checkpointing=True)
            worker.model.enable_gradient_checkpointing()
            reset_peak(device)
            checkpointed_epoch = lag0_epoch(state["batches"], "checkpointed", worker.policy_version,
                                            np.random.default_rng(args.seed))
            synchronize(device)
            start = time.perf_counter()
            worker.train(*checkpointed_epoch)
            synchronize(device)
            result["plan_checkpointed"] = {**compare_plan(checkpointed, peak_gib(device)),
                                           "update_s": time.perf_counter() - start}
            load_lora_state(worker.model.denoiser, state["sampled_weights"])
            return True

        def plain():
            model = state["model"]
            s = config.sample

            def call(prompts, seeds):
                generators = [torch.Generator().manual_seed(seed) for seed in seeds]
                return model.pipe(prompt=prompts, num_inference_steps=s.num_steps, guidance_scale=s.guidance_scale,
                                  height=s.height, width=s.width, generator=generators, output_type="np",
                                  max_sequence_length=model.max_sequence_length).images

            reset_peak(device)
            _, seconds = timed_batches(call, args.batches, args.sample_batch, device)
            images_per_s = args.batches * args.sample_batch / sum(seconds)
            result["plain_pipeline"] = {"images_per_s": images_per_s, "batch_s": seconds, "peak_gib": peak_gib(device),
                                        "lora": "attached (B = 0), as in our sampler"}
            result["sampler_over_plain"] = result["sampler"]["images_per_s"] / images_per_s
            with reference_policy(model.denoiser):
                _, seconds = timed_batches(call, args.batches, args.sample_batch, device)
            result["plain_pipeline"]["images_per_s_without_lora"] = args.batches * args.sample_batch / sum(seconds)
            return True

        ratio_errors = result.setdefault("ratio_error", {"clip_range": args.clip_range})

        def ratio_bf16():
            model, stored = state["model"], first_rows(state["batches"][0], args.ratio_samples)
            recomputed = recompute_log_probs(model, stored, config, args.recompute_batch, args.seed)
            name = f"{_short(model)}_sampled_{_short(model)}_recomputed"
            ratio_errors[name] = ratio_error(recomputed, stored.log_probs, args.clip_range)
            return True

        def ratio_fp32():
            model = state["model"]
            was = _short(model)
            model.pipe.to(dtype=torch.float32)  # the same weights, float32 (the LoRA already is)
            model.prompt_cache = PromptCache(config.model.prompt_cache_size)  # its rows were bfloat16
            stored = first_rows(state["batches"][0], args.ratio_samples)
            reset_peak(device)
            recomputed = recompute_log_probs(model, stored, config, args.recompute_batch, args.seed)
            ratio_errors[f"{was}_sampled_fp32_recomputed"] = ratio_error(recomputed, stored.log_probs, args.clip_range)
            prompts, seeds = batch_inputs(0, args.ratio_samples)
            sampled = sample_trajectories(model, prompts, seeds, config.sample)
            recomputed = recompute_log_probs(model, sampled, config, args.recompute_batch, args.seed)
            ratio_errors["fp32_sampled_fp32_recomputed"] = ratio_error(recomputed, sampled.log_probs, args.clip_range)
            ratio_errors["fp32_peak_gib"] = peak_gib(device)
            return True

        built = phases.run("build", build)
        sampled = phases.run("worker_sample", worker_sample, built)
        trained = phases.run("worker_train", worker_train, sampled)
        phases.run("plan", plan, trained)
        phases.run("plain", plain, sampled)
        phases.run("ratio_bf16", ratio_bf16, sampled)
        phases.run("ratio_fp32", ratio_fp32, sampled)
        ratio_errors["verdict"] = dtype_verdict(ratio_errors, args.clip_range)
        ratio_errors["note"] = (
            "the SDE step and its log-prob compute in float32 (ddpo/flow.py); the dtype in question is the "
            f"transformer's forward, model.dtype. Recomputed {args.recompute_batch} samples a forward (the sampler: "
            f"{args.sample_batch}, the learner: {args.train_batch}); an error of exactly 0 means the forward gave "
            "bitwise the same numbers at both batch shapes")
        state.clear()
        free_memory(device)
    result["elapsed_s"] = time.perf_counter() - phases.start
    phases.write()
    print(json.dumps(result, indent=2))
    return result


def _short(model: ModelFamily) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[model.denoiser.dtype]


if __name__ == "__main__":
    main()
