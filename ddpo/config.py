"""The experiment config: a typed schema, YAML loading, `--set key=value` overrides, validation.

Every field has a default; a YAML file overrides some of them, and `--set` overrides the file.
Anything wrong is a `ConfigError` whose one-line message names the field to fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ddpo.errors import ConfigError


@dataclass
class ModelConfig:
    # A local diffusers folder, a Hugging Face hub id, or `builtin:tiny` (a tiny random
    # Stable-Diffusion-shaped pipeline built in code, for CPU smoke runs and tests).
    pretrained: str = "builtin:tiny"
    revision: str | None = None
    # `auto` picks cuda when available, else cpu.
    device: str = "auto"
    # dtype of the frozen weights and of the stored latents (float16 on GPU, as the paper).
    # The LoRA weights always train in float32.
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # SD3 / FLUX: the T5 tokens of a prompt (zeros where the model has no T5). None = the
    # pipeline's default (SD3 256, FLUX 512), or for a builtin model the length it was trained with
    max_sequence_length: int | None = None
    # encode the run's prompts (and the empty one) at load, keep their embeddings for the run, and
    # move the frozen text encoders to the CPU (SD3.5: 11.2 GB off the device, FLUX.1: 9.8 GB in
    # bf16); a prompt outside the set is still encoded there, slowly. The kept embeddings stay on
    # the device up to prompt_cache_size prompts, else in host memory, moved per batch
    # (ddpo.families.ModelFamily.offload_text_encoders)
    offload_text_encoders: bool = False
    # prompts whose text embeddings are kept on the device, the least recently used leaving first:
    # a prompt is encoded once per run, and sampling and training reuse its embeddings
    # (ddpo.families.ModelFamily.conditioning); 0 = none kept, every call encodes. The default
    # holds the shipped prompt sets (the largest: 398); a prompt costs SD1.5 0.12 MB, SDXL 0.3 MB,
    # SD3.5 2.7 MB, FLUX.1 4.2 MB of device memory (bf16)
    prompt_cache_size: int = 512


@dataclass
class LoraConfig:
    rank: int = 4
    alpha: float = 4.0
    # modules that get the adapter; empty: the family's attention projections (the UNet's
    # to_q/to_k/to_v/to_out.0 as the public DDPO implementation; for SD3 and FLUX, those of the
    # joint blocks' image and text streams as Flow-GRPO)
    target_modules: list[str] = field(default_factory=list)


@dataclass
class PromptConfig:
    # An inline list, or a file (when set, it replaces the list; a relative path is relative to
    # the config file's folder): a text file with one prompt per line, or JSON Lines (`.jsonl`),
    # one object per line with its prompt under "prompt" and the rest as that prompt's metadata,
    # which reaches the reward as `metadata` (GenEval's evaluation_metadata.jsonl as published;
    # {"prompt": ..., "text": ...} for the OCR reward's target text)
    prompts: list[str] = field(default_factory=lambda: ["a cat", "a dog", "a horse", "a bird"])
    file: str | None = None


@dataclass
class DDIMConfig:
    # eta of the DDIM step's std sigma_t = eta * sqrt((1 - a_{t-1}) / (1 - a_t)) *
    # sqrt(1 - a_t / a_{t-1}) (DDIM formula (16)); > 0, as the step needs noise for a log-prob
    # (1: DDPM's variance, as the paper)
    eta: float = 1.0


@dataclass
class FlowConfig:
    # a in the Flow-GRPO SDE's noise std a*sqrt(sigma/(1-sigma)); with CPS, the step's std is
    # sigma_next * sin(noise_level * pi / 2)
    noise_level: float = 0.7
    # the stochastic step. `flow_grpo`: Flow-GRPO's SDE (noise_level is a in its std
    # a*sqrt(sigma/(1-sigma))); `cps`: coefficients-preserving sampling (Wang & Yu 2025),
    # std = sigma_next * sin(noise_level * pi / 2), no excess noise left in the image
    sde_type: Literal["flow_grpo", "cps"] = "flow_grpo"
    # only `sde_window` consecutive steps are stochastic, stored and trained; the others are the
    # deterministic flow ODE (Euler). 0 = every step stochastic (Flow-GRPO)
    sde_window: int = 0
    # where the window lies: `random` (Flow-GRPO-Fast), its first step drawn per sample batch
    # from the epoch plan; `sliding` (MixGRPO), starting at the range's first step and moving
    # `sde_window_shift` steps every `sde_window_interval` epochs
    sde_window_schedule: Literal["random", "sliding"] = "random"
    # the steps [first, end) the window stays within
    sde_window_range: list[int] = field(default_factory=lambda: [0, 5])
    sde_window_shift: int = 1
    sde_window_interval: int = 10


@dataclass
class SampleConfig:
    num_steps: int = 10
    guidance_scale: float = 5.0
    # positive; each model family has its own multiple (its pipeline's: 8 for SD and SDXL, 16
    # for SD3, FLUX and Qwen-Image at their published sizes; `ModelFamily.size_multiple`)
    height: int = 32
    width: int = 32
    # frames per sample: 1 for an image; a video family's clip length, on its VAE's frame rule
    # (Wan: 4k + 1, one latent frame per 4 frames after the first; `ModelFamily.frame_multiple`)
    num_frames: int = 1
    # images per sampler task (one "sample batch", the unit that carries an id)
    batch_size: int = 8
    # sample batches per epoch; samples per epoch = batch_size * num_batches_per_epoch
    num_batches_per_epoch: int = 4
    # log p(x_{t-1} | x_t, c) over the latent's elements: `mean` as the public implementation
    # (its hyperparameters assume it), or `sum` for the true Gaussian log density.
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    # the settings of each kind of step; a model family reads its own kind's and refuses the
    # others' set away from their defaults (`ModelFamily.step_settings`): the DDIM step of the
    # UNet families (SD 1.x/2.x, SDXL)...
    ddim: DDIMConfig = field(default_factory=DDIMConfig)
    # ...and the flow-matching SDE step of the transformer families (SD3, FLUX, Qwen-Image)
    flow: FlowConfig = field(default_factory=FlowConfig)

    @property
    def stored_steps(self) -> int:
        """The steps of a trajectory that are stochastic, stored and trained: the window's, or all."""
        return self.flow.sde_window or self.num_steps


@dataclass
class TrainConfig:
    # `diffusion_nft` (flow-matching models): DiffusionNFT (Zheng et al. 2025), trained on the
    # forward process from the final images alone; the samplers run the plain flow ODE
    algorithm: Literal["ddpo_is", "ddpo_sf", "rwr", "diffusion_nft"] = "ddpo_is"
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    # samples per minibatch; one optimizer step per `gradient_accumulation_steps` minibatches
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_inner_epochs: int = 1
    # timesteps of a minibatch run through the UNet in one forward (the same math, a bigger
    # batch: faster where the device has room; bench/learner_timesteps.py measures it)
    timesteps_per_forward: int = 1
    # fraction of each trajectory's timesteps trained on: a fresh random subset per sample
    # (`random`, as the public implementation), or its first, noisiest steps (`earliest`), where
    # the image's content is decided; the last, nearly noiseless steps add large score-function
    # noise and little signal (bench/gradient_snr.py measures it per step)
    timestep_fraction: float = 1.0
    timestep_selection: Literal["random", "earliest"] = "random"
    shuffle_samples: bool = True
    shuffle_timesteps: bool = True
    # classifier-free guidance in the training forward pass, as in sampling
    cfg: bool = True
    # recompute the denoiser's activations in the backward pass instead of keeping them: less
    # memory for about one more forward's time; the update is the same
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    # beta of the KL penalty to the reference policy (the base model: the adapter switched off),
    # loss += beta * ||mu_theta - mu_ref||^2 / (2 sigma^2) per step; 0 = none (no extra forward)
    kl_coef: float = 0.0
    # DDPO-IS: PPO clip range of the ratio
    clip_range: float = 1e-4
    # advantages are clipped to [-adv_clip_max, adv_clip_max]
    adv_clip_max: float = 5.0
    # decoupled PPO for max_policy_lag >= 1: truncation c of the importance weight
    # min(c, p_prox / p_behaviour)
    importance_weight_cap: float = 1.0
    # RWR: weights exp(r / beta), or 0/1 weights on the top `rwr_top_fraction` if sparse
    rwr_beta: float = 1.0
    rwr_sparse: bool = False
    rwr_top_fraction: float = 0.1
    # DiffusionNFT: beta of the implicit policies v+ = (1 - beta) v_old + beta v_theta and
    # v- = (1 + beta) v_old - beta v_theta (the paper's default 1)
    nft_beta: float = 1.0
    # DiffusionNFT: after each update the old policy (which samples) moves toward the trained one,
    # v_old <- d v_old + (1 - d) v_theta, with d = min(nft_decay_rate * optimizer steps so far,
    # nft_decay_max): on-policy at first, then ever smoother (the paper's decay_type 1)
    nft_decay_rate: float = 0.001
    nft_decay_max: float = 0.5
    # DiffusionNFT: each squared error taken on the predicted x_0 and divided by its mean absolute
    # value (the public code's adaptive weighting); false: the plain velocity errors
    nft_adaptive_weight: bool = True


@dataclass
class AdvantageConfig:
    # `per_prompt_buffer`: rewards normalised by a running buffer of the prompt's recent rewards
    # (the paper); `group`: GRPO, each prompt sampled `group_size` times per epoch and its
    # rewards normalised within that group, this epoch's rewards only; `batch`: by the
    # statistics of the whole update
    mode: Literal["per_prompt_buffer", "group", "batch"] = "per_prompt_buffer"
    # per_prompt_buffer: running buffer of recent rewards per prompt
    buffer_size: int = 32
    # per_prompt_buffer: below this many rewards for a prompt, normalise with the batch's statistics
    min_count: int = 16
    # group: samples per prompt per epoch (the samples per epoch must be a multiple of it)
    group_size: int = 8
    # group: divide by the std of all the update's rewards instead of the group's (Flow-GRPO's
    # global_std option: groups whose rewards hardly differ are not blown up)
    global_std: bool = False


@dataclass
class RewardTerm:
    name: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardConfig:
    # a registered reward (see `rewards/`) or a `module:function` path, and its keyword arguments
    name: str = "jpeg_compressibility"
    params: dict[str, Any] = field(default_factory=dict)
    # several rewards combined as r = sum_i weight_i * r_i; when set, it replaces name/params
    weighted: list[RewardTerm] = field(default_factory=list)
    # a free reward actor scores every sample batch waiting (whole batches, from any sampler)
    # in one call of up to this many images
    max_batch_images: int = 64
    # an image reward on a video model scores every frame; a clip's reward is the frames'
    # `mean`, or their `min` (every frame must be good)
    frame_reduction: Literal["mean", "min"] = "mean"
    # a call that raises or runs longer than this is retried once on another reward actor,
    # then the run fails naming the reward
    timeout_s: float = 600.0
    # the name of a reward service (`ddpo serve-rewards`) already running on the cluster: the
    # run sends its batches there instead of starting reward actors of its own (null: its own)
    service: str | None = None
    # the guard against reward hacking: rewards never trained on (r = sum_i weight_i * r_i, as
    # `weighted`), scored on the fixed eval batch every `eval_every` epochs beside the trained one
    # (with eval_every 0, before and after training only, and the guard never fires)
    heldout: list[RewardTerm] = field(default_factory=list)
    # when the trained eval reward has risen above its value at the best held-out evaluation
    # while the held-out reward has fallen more than `heldout_tolerance` below its best, for
    # `heldout_patience` evaluations in a row: `warn` prints one line; `stop` ends the run naming
    # the best held-out checkpoint (`checkpoints/best`); `rollback` loads that checkpoint and
    # goes on at half the learning rate
    heldout_action: Literal["warn", "stop", "rollback"] = "warn"
    heldout_tolerance: float = 0.05
    heldout_patience: int = 2

    def terms(self) -> list[RewardTerm]:
        return list(self.weighted) or [RewardTerm(self.name, 1.0, dict(self.params))]

    @property
    def label(self) -> str:
        """The reward's name in messages and reports: `aesthetic`, or `jpeg_compressibility + digit_judge`."""
        return " + ".join(term.name for term in self.terms())


@dataclass
class ActorResources:
    # Ray CPUs; `auto`: the cluster's CPUs shared evenly between the devices of the layout
    # (see ClusterConfig.layout), fractions allowed
    num_cpus: float | Literal["auto"] = "auto"
    num_gpus: float = 0.0
    # custom Ray resources, e.g. {"sampler_node": 1} to pin actors to the nodes that offer it
    resources: dict[str, float] = field(default_factory=dict)
    # torch threads; `auto`: the CPUs of the actor's device, rounded down, at least 1 (a
    # sampler and a learner that share a device take turns, so each may use all of it)
    num_threads: int | Literal["auto"] = "auto"


@dataclass
class ClusterConfig:
    # None: start a local Ray instance (dashboard on 127.0.0.1); `auto` or `ray://...`: connect
    address: str | None = None
    # `auto`: one per device of the machine (its GPUs, or its CPU cores up to 4 for a CPU
    # model), no more samplers than sample batches per epoch, no more learners than samples
    # per minibatch
    num_samplers: int | Literal["auto"] = 1
    # ranks of the one logical learner (a torch.distributed group: gloo on CPU, NCCL on GPU);
    # each trains on its slice of every minibatch, and the numbers do not depend on the count
    num_learners: int | Literal["auto"] = 1
    num_reward_actors: int = 1
    # 0: fully synchronous, the paper's algorithm; k >= 1: train on batches made with weights
    # up to k versions old (decoupled PPO corrects for it); older batches are dropped and counted
    max_policy_lag: int = 0
    # a sampler or reward actor that dies is restarted up to this many times, and the tasks it
    # had in flight are run again on it (a batch id still counts once)
    max_restarts: int = 3
    # a learner rank that dies restarts the whole learner group, up to this many times in a run:
    # from the run's latest checkpoint (or the initial weights), redoing the epochs after it
    # (at max_policy_lag 0 the run ends as if undisturbed); after that, the run ends
    learner_max_restarts: int = 3
    # `colocated`: sampler-i and learner-i share device i, which samples, then trains (lag 0);
    # `separate`: every sampler and learner has a device of its own, so that sampling and
    # training overlap (lag >= 1); `auto`: colocated at max_policy_lag 0, else separate.
    # A device is one placement-group bundle: the larger of the sampler's and learner's asks
    layout: Literal["auto", "colocated", "separate"] = "auto"
    # the placement group of all actors: PACK (as few nodes as possible) or SPREAD
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # fail instead of waiting longer than this for the actors' resources
    placement_timeout_s: float = 60.0
    # after a stop signal (SIGTERM, SIGHUP, Ctrl-C), the time the driver gives itself to reach
    # the next safe point and write its checkpoint; then it stops at once, the checkpoints
    # already written whole. Keep it below the grace of whoever sends the signal: Kubernetes'
    # terminationGracePeriodSeconds (30 s by default), `ray job stop`'s RAY_JOB_STOP_WAIT_TIME_S
    # (3 s by default: give the job more), `docker stop -t` (10 s)
    stop_grace_s: float = 25.0
    # the memory of one device in GiB (as nvidia-smi's MiB / 1024): `ddpo train` refuses a layout
    # whose memory plan (ddpo/memory.py, `ddpo plan`) does not fit in it. None: the local GPU's,
    # when the model runs on one here; else unknown, and nothing is refused
    device_memory_gb: float | None = None
    sampler: ActorResources = field(default_factory=ActorResources)
    reward: ActorResources = field(default_factory=lambda: ActorResources(num_cpus=0.0))
    learner: ActorResources = field(default_factory=ActorResources)


@dataclass
class Config:
    run_name: str | None = None  # default: a timestamp
    output_dir: str = "runs"
    seed: int = 0
    num_epochs: int = 10
    # write a LoRA checkpoint every this many epochs (and at the end); 0 = only at the end
    checkpoint_every: int = 0
    # also write one at the end of the first epoch that ends this many seconds or more after the
    # last checkpoint (or the run's start): what a SIGKILL, an OOM or a lost driver can cost. A
    # checkpoint takes 0.02-0.04 s on the digits default and 0.05-0.12 s (9.8 MB) with SD 1.5's
    # rank-4 LoRA (bench/checkpoint_cost.py, 2 shared cores): at most 0.02% of the wall time at
    # 600 s; what bounds it is the disk, as every checkpoint is kept. 0 = none by time
    checkpoint_every_s: float = 600.0
    # also write the latents of every trajectory to Parquet (large)
    save_latents: bool = False
    # images of the fixed batch sampled before and after training (`before_after.png`); 0 = none
    eval_images: int = 16
    # also sample and score the fixed batch every this many epochs (`eval_reward_mean` and, with
    # reward.heldout, `heldout_reward_mean` in that epoch's metrics); 0 = before and after only
    eval_every: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def samples_per_epoch(self) -> int:
        return self.sample.batch_size * self.sample.num_batches_per_epoch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_prompts(self) -> list[str]:
        """The prompt list, from `prompts.file` if given; empty lists are a ConfigError."""
        return [prompt for prompt, _ in self._read_prompts()]

    def load_prompt_metadata(self) -> dict[str, dict[str, Any]]:
        """Each prompt's metadata from a JSON Lines prompts file (its fields but "prompt");
        prompts without any are left out."""
        return {prompt: metadata for prompt, metadata in self._read_prompts() if metadata}

    def _read_prompts(self) -> list[tuple[str, dict[str, Any]]]:
        """(prompt, metadata) in the file's order; a malformed or empty file is a ConfigError
        naming the line."""
        if self.prompts.file is None:
            return [(prompt, {}) for prompt in self.prompts.prompts]
        path = Path(self.prompts.file)
        if not path.is_file():
            raise ConfigError(f"prompts.file: no such file '{path}'")
        lines = [(number, line.strip()) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
        if not lines:
            raise ConfigError(f"prompts.file: '{path}' holds no prompts (one per line expected)")
        if path.suffix != ".jsonl":
            return [(line, {}) for _, line in lines]
        prompts, seen = [], {}
        for number, line in lines:
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ConfigError(f"prompts.file: {path}:{number} is not JSON ({err})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ConfigError(f"prompts.file: {path}:{number} has no \"prompt\" string")
            prompt = record.pop("prompt")
            if seen.setdefault(prompt, record) != record:
                raise ConfigError(f"prompts.file: {path}:{number} repeats the prompt '{prompt}' with other "
                                  "metadata; a prompt has one metadata")
            prompts.append((prompt, record))
        return prompts


# ---------------------------------------------------------------------------------------------
# Building a Config from nested dicts, with the field path in every error.


def _finite(value: Any, key: str) -> Any:
    """A free-form value as YAML gave it, checked for NaN and infinities down its dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite(v, f"{key}[{i}]")
    return value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    if annotation is Any:  # free-form values (a reward's params), passed on as YAML gave them
        return _finite(value, key)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(annotation, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for inner in [a for a in args if a is not type(None)]:
            try:
                return _coerce(value, inner, key)
            except ConfigError as err:
                errors.append(str(err).removeprefix(f"{key}: "))
        raise ConfigError(f"{key}: " + "; or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):  # YAML's .nan and .inf, `--set key=nan` or `inf`
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} at {key}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown config key{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{f.name}: required")
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.learning_rate=1e-3", ...]` -> nested dict; values are parsed as YAML."""
    data: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# Keys that moved in this release, old -> new: the old ones are still read, each use with one
# FutureWarning naming the new key, until the next release. `sample.eta` and the flow SDE's
# settings moved under the step they belong to (a model family reads one kind of step).
MOVED_KEYS = {
    "sample.eta": "sample.ddim.eta",
    **{f"sample.{name}": f"sample.flow.{name}"
       for name in ("noise_level", "sde_type", "sde_window", "sde_window_schedule", "sde_window_range",
                    "sde_window_shift", "sde_window_interval")},
}


def _move_old_keys(data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` (one YAML file's keys, or the `--set` overrides') with the keys of MOVED_KEYS moved
    to their new place, warning once for each; the old and the new key of one setting both in
    `where` is a ConfigError."""
    for old, new in MOVED_KEYS.items():
        *old_path, old_name = old.split(".")
        parent = data
        for part in old_path:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or old_name not in parent:
            continue
        *new_path, new_name = new.split(".")
        target = data
        for part in new_path:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{new.rpartition('.')[0]}: expected a mapping, got {child!r}")
            target = child
        if new_name in target:
            raise ConfigError(f"{old}: the old name of {new}, which {where} sets too; keep {new} alone")
        target[new_name] = parent.pop(old_name)
        warnings.warn(f"{old} is deprecated: use {new} (the old key goes in the next release; found in {where})",
                      FutureWarning, stacklevel=3)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (None: all defaults), apply `key=value` overrides, validate. Keys of an
    earlier release (MOVED_KEYS) are read at their new place, with a FutureWarning."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file '{path}'")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"--config: '{path}' is not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config: '{path}' must hold a mapping of config keys")
        data = _move_old_keys(data, f"'{path}'")
    data = _merge(data, _move_old_keys(parse_overrides(overrides or []), "--set"))
    config = _build(Config, data)
    if path is not None and config.prompts.file is not None:  # relative to the config's folder
        config.prompts.file = str((path.resolve().parent / config.prompts.file).resolve())
    validate(config)
    return config


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# The forms of a torch device this project runs on, checked without importing torch (whether
# this machine has the device is the command line's check: on a cluster, the workers' matters).
DEVICE_FORM = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# A Ray cluster to join: `auto` (the one running on this machine), a Ray Client address
# `ray://host:port`, or the head's GCS address `host:port` (an IPv6 host in brackets).
ADDRESS_FORM = re.compile(r"(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})")


def check_device(device: str, field: str) -> None:
    """`device` has the form of a device: auto, cpu, cuda, cuda:N or mps; else a ConfigError naming `field`."""
    _check(DEVICE_FORM.fullmatch(device) is not None,
           f"{field}: must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


def check_address(address: str, field: str) -> None:
    """`address` has the form of a Ray cluster's address: auto, ray://host:port or host:port."""
    form = ADDRESS_FORM.fullmatch(address)
    _check(address == "auto" or (form is not None and 1 <= int(form.group(3)) <= 65535),
           f"{field}: must be auto, ray://host:port or host:port, got {address!r}")


def _validate_flow(config: Config) -> None:
    """The flow step's settings: its noise, the SDE window and the step type; which families
    take them is checked at load (`ModelFamily.check_config`)."""
    s, f, t = config.sample, config.sample.flow, config.train
    _check(f.noise_level > 0, "sample.flow.noise_level: must be > 0 (with no noise the flow step is "
                              "deterministic and has no log-probability)")
    _check(f.sde_window >= 0, "sample.flow.sde_window: must be >= 0 (0 = every step stochastic)")
    _check(len(f.sde_window_range) == 2,
           f"sample.flow.sde_window_range: expected [first, end), got {f.sde_window_range}")
    first, end = f.sde_window_range
    # the range only places a window: without one (every step stochastic) it is not used, and the
    # default [0, 5) must not refuse a schedule of fewer steps
    _check(f.sde_window == 0 or 0 <= first < end <= s.num_steps,
           f"sample.flow.sde_window_range: must satisfy 0 <= first < end <= sample.num_steps ({s.num_steps}), "
           f"got {f.sde_window_range}")
    _check(f.sde_window == 0 or f.sde_window <= end - first,
           f"sample.flow.sde_window: a window of {f.sde_window} steps does not fit in sample.flow.sde_window_range "
           f"{f.sde_window_range} ({end - first} steps of sample.num_steps={s.num_steps})")
    _check(f.sde_window_shift >= 1, "sample.flow.sde_window_shift: must be >= 1")
    _check(f.sde_window_interval >= 1, "sample.flow.sde_window_interval: must be >= 1")
    if t.algorithm == "diffusion_nft":
        _check(f.sde_window == 0, "sample.flow.sde_window: diffusion_nft samples by the plain ODE and stores no "
                                  "steps; set it to 0")
        _check(f.sde_type == "flow_grpo", "sample.flow.sde_type: diffusion_nft samples by the plain ODE, with no "
                                          "SDE step; remove the setting")
        _check(s.guidance_scale == 1.0, "sample.guidance_scale: diffusion_nft is CFG-free (it trains the "
                                        "conditional velocity); set it to 1")
        _check(t.nft_beta > 0, "train.nft_beta: must be > 0")
        _check(t.nft_decay_rate >= 0, "train.nft_decay_rate: must be >= 0")
        _check(0 <= t.nft_decay_max < 1, "train.nft_decay_max: must be in [0, 1)")
    last = s.num_steps if f.sde_window == 0 else end
    _check(f.sde_type != "cps" or last < s.num_steps,
           "sample.flow.sde_type: cps has no noise at the last step (std = sigma_next = 0, no log-prob): use an "
           f"sde_window whose sde_window_range ends before sample.num_steps ({s.num_steps})")
    _check(t.algorithm != "rwr" or f.sde_window == 0,
           "sample.flow.sde_window: rwr trains on the final image x_0, which a windowed trajectory does not store; "
           "set it to 0")


def validate(config: Config) -> None:
    """Range and consistency checks that the types alone do not catch."""
    s, t, a, c = config.sample, config.train, config.advantage, config.cluster
    _check(0 <= config.seed < 2**32, f"seed: must be in [0, 2**32), got {config.seed}")
    _check(config.num_epochs >= 1, "num_epochs: must be >= 1")
    _check(config.checkpoint_every >= 0, "checkpoint_every: must be >= 0")
    _check(config.checkpoint_every_s >= 0, "checkpoint_every_s: must be >= 0 (0 = no checkpoints by time)")
    _check(config.eval_images >= 0, "eval_images: must be >= 0")
    check_device(config.model.device, "model.device")
    _check(config.model.prompt_cache_size >= 0,
           f"model.prompt_cache_size: must be >= 0 (0 = no cache), got {config.model.prompt_cache_size}")
    _check(config.model.max_sequence_length is None or config.model.max_sequence_length >= 1,
           f"model.max_sequence_length: must be >= 1 (or null: the model's own), got {config.model.max_sequence_length}")
    _check(config.lora.rank >= 1, "lora.rank: must be >= 1")
    _check(config.lora.alpha > 0, "lora.alpha: must be > 0")
    _check(config.prompts.file is not None or len(config.prompts.prompts) > 0,
           "prompts.prompts: the prompt list is empty")
    _check(s.num_steps >= 1, "sample.num_steps: must be >= 1")
    _check(s.ddim.eta > 0, "sample.ddim.eta: must be > 0 (with eta = 0 the DDIM step is deterministic "
                           "and has no log-probability)")
    _check(s.guidance_scale >= 1.0, "sample.guidance_scale: must be >= 1 (1 = no guidance)")
    # the multiple they must be is the model family's (ModelFamily.size_multiple, checked at load)
    _check(s.height > 0 and s.width > 0, "sample.height/sample.width: must be positive")
    _check(s.num_frames >= 1, "sample.num_frames: must be >= 1 (1 for an image)")
    _check(s.batch_size >= 1, "sample.batch_size: must be >= 1")
    _validate_flow(config)
    _check(s.num_batches_per_epoch >= 1, "sample.num_batches_per_epoch: must be >= 1")
    _check(t.learning_rate > 0, "train.learning_rate: must be > 0")
    _check(0 <= t.adam_beta1 < 1, "train.adam_beta1: must be in [0, 1)")
    _check(0 <= t.adam_beta2 < 1, "train.adam_beta2: must be in [0, 1)")
    _check(t.adam_weight_decay >= 0, "train.adam_weight_decay: must be >= 0")
    _check(t.adam_epsilon > 0, "train.adam_epsilon: must be > 0")
    _check(t.batch_size >= 1, "train.batch_size: must be >= 1")
    _check(config.samples_per_epoch % t.batch_size == 0,
           f"train.batch_size: must divide the samples per epoch "
           f"({s.batch_size} x {s.num_batches_per_epoch} = {config.samples_per_epoch})")
    _check(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps: must be >= 1")
    _check((config.samples_per_epoch // t.batch_size) % t.gradient_accumulation_steps == 0,
           "train.gradient_accumulation_steps: must divide the minibatches per epoch "
           f"({config.samples_per_epoch // t.batch_size})")
    _check(t.num_inner_epochs >= 1, "train.num_inner_epochs: must be >= 1")
    _check(t.timesteps_per_forward >= 1, "train.timesteps_per_forward: must be >= 1")
    _check(0 < t.timestep_fraction <= 1, "train.timestep_fraction: must be in (0, 1]")
    _check(t.clip_range > 0, "train.clip_range: must be > 0")
    _check(t.adv_clip_max > 0, "train.adv_clip_max: must be > 0")
    _check(t.max_grad_norm > 0, "train.max_grad_norm: must be > 0")
    _check(t.importance_weight_cap > 0, "train.importance_weight_cap: must be > 0")
    _check(t.rwr_beta > 0, "train.rwr_beta: must be > 0")
    _check(0 < t.rwr_top_fraction <= 1, "train.rwr_top_fraction: must be in (0, 1]")
    _check(t.kl_coef >= 0, "train.kl_coef: must be >= 0")
    _check(a.group_size >= 2, "advantage.group_size: must be >= 2 (a group of one has no spread)")
    _check(a.mode != "group" or config.samples_per_epoch % a.group_size == 0,
           f"advantage.group_size: must divide the samples per epoch "
           f"({s.batch_size} x {s.num_batches_per_epoch} = {config.samples_per_epoch})")
    _check(a.buffer_size >= 1, "advantage.buffer_size: must be >= 1")
    _check(1 <= a.min_count <= a.buffer_size,
           "advantage.min_count: must be between 1 and advantage.buffer_size")
    _check(bool(config.reward.weighted) or config.reward.name.strip() != "", "reward.name: must not be empty")
    for i, term in enumerate(config.reward.weighted):
        _check(term.name.strip() != "", f"reward.weighted[{i}].name: must not be empty")
        _check(term.weight != 0, f"reward.weighted[{i}].weight: must be nonzero (drop the term instead)")
    for i, term in enumerate(config.reward.heldout):
        _check(term.name.strip() != "", f"reward.heldout[{i}].name: must not be empty")
        _check(term.weight != 0, f"reward.heldout[{i}].weight: must be nonzero (drop the term instead)")
    _check(config.reward.heldout_tolerance >= 0, "reward.heldout_tolerance: must be >= 0")
    _check(config.reward.heldout_patience >= 1, "reward.heldout_patience: must be >= 1")
    _check(config.eval_every >= 0, "eval_every: must be >= 0 (0 = before and after training only)")
    _check(config.reward.service is None or config.reward.service.strip() != "",
           "reward.service: must be a service name or null")
    _check(config.reward.max_batch_images >= 1, "reward.max_batch_images: must be >= 1")
    _check(config.reward.timeout_s > 0, "reward.timeout_s: must be > 0")
    if c.address is not None:
        check_address(c.address, "cluster.address")
    _check(c.num_samplers == "auto" or c.num_samplers >= 1, "cluster.num_samplers: must be >= 1 or auto")
    _check(c.num_learners == "auto" or c.num_learners >= 1, "cluster.num_learners: must be >= 1 or auto")
    _check(c.num_learners == "auto" or c.num_learners <= t.batch_size,
           f"cluster.num_learners: {c.num_learners} learners cannot split a minibatch of "
           f"train.batch_size={t.batch_size} samples; use at most {t.batch_size}")
    _check(c.num_reward_actors >= 1, "cluster.num_reward_actors: must be >= 1")
    _check(c.max_policy_lag >= 0, "cluster.max_policy_lag: must be >= 0")
    _check(c.max_restarts >= 0, "cluster.max_restarts: must be >= 0")
    _check(c.learner_max_restarts >= 0, "cluster.learner_max_restarts: must be >= 0")
    for role in ("sampler", "reward", "learner"):
        res = getattr(c, role)
        _check((res.num_cpus == "auto" or res.num_cpus >= 0) and res.num_gpus >= 0
               and all(v >= 0 for v in res.resources.values()),
               f"cluster.{role}: num_cpus, num_gpus and resources must be >= 0")
        _check(res.num_threads == "auto" or res.num_threads >= 1, f"cluster.{role}.num_threads: must be >= 1 or auto")
    _check(c.placement_timeout_s > 0, "cluster.placement_timeout_s: must be > 0")
    _check(c.stop_grace_s > 0, "cluster.stop_grace_s: must be > 0")
    _check(c.device_memory_gb is None or c.device_memory_gb > 0,
           "cluster.device_memory_gb: must be > 0 (or null: the local GPU's, else unknown)")
