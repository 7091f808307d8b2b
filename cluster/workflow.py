"""After a run: `ddpo sample` (images from a checkpoint, or from the base model), `ddpo eval`
(a checkpoint's or the base model's reward, mean and standard error overall and per prompt) and
`ddpo export` (a LoRA-only diffusers folder with a model card, or the LoRA fused into a full
pipeline).

The images are sampled in the calling process; `ddpo eval` scores them on Ray, in reward actors
behind the reward pool as in training. Every problem the user can fix is a one-line
`ddpo.errors.UserError`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from cluster.run_dir import latest_checkpoint, sample_grids, write_grid
from ddpo.config import Config, check_device, load_config
from ddpo.errors import ConfigError
from ddpo.pipeline import BUILTIN_FOLDERS, BUILTIN_MAX_SEQUENCE_LENGTH, BUILTIN_TINY, check_device_here
from rewards import check_rewards

LORA_FILE = "pytorch_lora_weights.safetensors"
# image i of every prompt starts from the noise of seed SEED_BASE + S * SEED_STRIDE + i (`--seed S`):
# the same command gives the same images, whatever the prompts and batches; far from the
# training epochs' seeds and the eval batch's (ddpo/plan.py)
SEED_BASE, SEED_STRIDE = 2**61, 2**20


# -- the run directory ------------------------------------------------------------------------


def open_run(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[Path, Config]:
    """The run directory and its config.yaml, with `--set` overrides applied."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory (no config.yaml there)")
    return run_dir, load_config(run_dir / "config.yaml", overrides)


def checkpoint_names(run_dir: Path) -> list[str]:
    """The run's checkpoints that hold a LoRA, oldest first, then `best` (the reward-hacking
    guard's best held-out one) when there is one."""
    root = run_dir / "checkpoints"
    best = ["best"] if (root / "best" / LORA_FILE).is_file() else []
    return sorted(p.parent.name for p in root.glob(f"epoch_*/{LORA_FILE}")) + best


def find_checkpoint(run_dir: Path, name: str | None, hint: str = "") -> Path:
    """The checkpoint `name` (`epoch_0007`, `best`), or the latest one when None."""
    names = checkpoint_names(run_dir)
    if name is None:
        latest = latest_checkpoint(run_dir)
        epochs = [name for name in names if name != "best"]
        if latest is None and epochs:  # a LoRA without the learner's state
            latest = run_dir / "checkpoints" / epochs[-1]
        if latest is None:
            raise ConfigError(f"'{run_dir}' has no checkpoint (no checkpoints/epoch_NNNN/{LORA_FILE}){hint}")
        return latest
    if name not in names:
        there = ", ".join(names) if names else "none"
        raise ConfigError(f"--checkpoint: no checkpoint '{name}' in '{run_dir / 'checkpoints'}' (there: {there})")
    return run_dir / "checkpoints" / name


def epochs_trained(checkpoint: Path) -> int:
    """The epochs trained into a checkpoint: its learner's policy version (else its name's N + 1)."""
    state = checkpoint / "learner_state.json"
    if state.is_file():
        return int(json.loads(state.read_text())["policy_version"])
    number = checkpoint.name.removeprefix("epoch_")
    return int(number) + 1 if number.isdigit() else 0


def slug(prompt: str, max_len: int = 60) -> str:
    """A file-name-safe form of a prompt: lower case, runs of other characters as one '-'."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_len].strip("-")
    return text or "prompt"


def sample_seed(seed: int, index: int) -> int:
    return (SEED_BASE + seed * SEED_STRIDE + index) % 2**63


# -- ddpo sample ------------------------------------------------------------------------------


@dataclass
class SampleResult:
    out: Path
    samples: list[Path]  # one file a sample: .png an image, .mp4 a video (ddpo.media)
    grid: Path
    checkpoint: Path | None  # None: the base model
    epochs: int


def sample_run(run_dir: str | Path, checkpoint: str | None = None, base: bool = False,
               prompts: list[str] | None = None, num_per_prompt: int = 4, seed: int = 0,
               out: str | Path | None = None, overrides: list[str] | None = None,
               batch_size: int | None = None, progress: bool = True) -> SampleResult:
    """Sample `num_per_prompt` images of each prompt with the run's model and sampler settings
    and the LoRA of a checkpoint (the latest by default; none with `base`), `batch_size` images
    a call (default `sample.batch_size`); image i of every prompt from seed `sample_seed(seed, i)`. Writes
    `<out>/<prompt-slug>_<i>.png` (a video family: `.mp4`, `Media.save`) and a captioned `<out>/grid.png`
    (a video family: also the animated `grid.gif`); default out: `RUN_DIR/samples_<checkpoint name>`
    (or `samples_base`)."""
    _check_sampling(checkpoint, base, num_per_prompt, batch_size)
    if prompts is not None and not all(p.strip() for p in prompts):
        raise ConfigError("--prompt: an empty prompt")
    run_dir, config, ckpt = _open_for_sampling(run_dir, overrides, checkpoint, base)
    prompts = list(dict.fromkeys(prompts or config.load_prompts()))
    out = Path(out) if out is not None else run_dir / f"samples_{ckpt.name if ckpt else 'base'}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: '{out}' is a file")
    epochs = epochs_trained(ckpt) if ckpt else 0

    model = load_model(config, ckpt)
    names = _file_names(prompts)
    items = [(prompt, i) for prompt in prompts for i in range(num_per_prompt)]
    out.mkdir(parents=True, exist_ok=True)
    records, paths = [], []
    for batch, trajectories, record in sample_items(model, config, items, seed, batch_size, epochs, progress):
        records.append(record)
        for index, (prompt, i) in enumerate(batch):
            paths.append(trajectories.media.save(index, out / f"{names[prompt]}_{i}"))
    title = (f"{ckpt.name} ({epochs} epochs trained)" if ckpt else "the base model (no LoRA)") + f", --seed {seed}"
    grid = sample_grids(pa.Table.from_batches(records), max_images=len(items), title=title,
                        cols=min(num_per_prompt, 8))
    write_grid(grid, out / "grid")  # grid.png, and a video family's grid.gif
    return SampleResult(out, paths, out / "grid.png", ckpt, epochs)


def _check_sampling(checkpoint: str | None, base: bool, num_per_prompt: int, batch_size: int | None) -> None:
    if base and checkpoint is not None:
        raise ConfigError("--base uses the base model without the LoRA; drop --checkpoint")
    if num_per_prompt < 1:
        raise ConfigError(f"--num-per-prompt: must be >= 1, got {num_per_prompt}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")


def _open_for_sampling(run_dir: str | Path, overrides: list[str] | None, checkpoint: str | None,
                       base: bool) -> tuple[Path, Config, Path | None]:
    """The run, its config (the model runs in this process: its device must be here) and the
    checkpoint to sample (None: the base model)."""
    run_dir, config = open_run(run_dir, overrides)
    check_device_here(config.model.device, "model.device", "use --set model.device=cpu or auto")
    return run_dir, config, None if base else find_checkpoint(run_dir, checkpoint, hint="; --base uses the base model")


def sample_items(model, config: Config, items: list[tuple[str, int]], seed: int, batch_size: int | None,
                 policy_version: int, progress: bool):
    """Sample image i of prompt p from seed `sample_seed(seed, i)` for each (p, i) of `items`,
    `batch_size` a call (default `sample.batch_size`). Yields each batch's items, its
    trajectories and its rows without latents (an Arrow record batch, as a sampler makes them).
    The last batch is padded to the full size (a few images sampled for nothing): every call
    has the same shapes, so an image comes out bit for bit the same whatever the other prompts
    (a batch of another size may round differently, by 1e-5 in the latents)."""
    from tqdm.auto import tqdm

    from ddpo.rollout import sample_trajectories
    from ddpo.plan import sde_steps
    from ddpo.trajectory import LATENTS, to_record_batch

    size = batch_size or config.sample.batch_size
    batches = [items[k:k + size] for k in range(0, len(items), size)]
    for k, batch in enumerate(tqdm(batches, desc="sampling", unit="batch", disable=not progress)):
        padded = batch + [batch[-1]] * (size - len(batch))
        trajectories = sample_trajectories(model, [p for p, _ in padded], [sample_seed(seed, i) for _, i in padded],
                                           config.sample, sde_steps(config, config.sample.flow.sde_window_range[0]))
        trajectories = _first(trajectories, len(batch))
        yield batch, trajectories, to_record_batch(trajectories, f"sample-{k}", policy_version).drop_columns([LATENTS])


def _first(trajectories, n: int):
    """The first n samples of a batch of trajectories."""
    from dataclasses import replace

    t = trajectories
    return replace(t, prompts=t.prompts[:n], seeds=t.seeds[:n], latents=t.latents[:n],
                   log_probs=None if t.log_probs is None else t.log_probs[:n],
                   timesteps=t.timesteps[:n], media=t.media[:n])


def load_model(config: Config, checkpoint: Path | None):
    """The run's model with the checkpoint's LoRA loaded as the learner loads it, or the base
    model (no adapter) when `checkpoint` is None."""
    from ddpo.lora import load_lora_state
    from ddpo.pipeline import load_pipeline, load_policy

    if checkpoint is None:
        m = config.model
        return load_pipeline(m.pretrained, m.revision, m.device, m.dtype, seed=config.seed,
                             max_sequence_length=m.max_sequence_length)
    model = load_policy(config)
    try:
        load_lora_state(model.denoiser, model.read_lora(checkpoint))
    except ValueError as err:  # a --set lora.rank=... that does not match the checkpoint
        raise ConfigError(f"{checkpoint}: {err}") from None
    return model


def _file_names(prompts: list[str]) -> dict[str, str]:
    """A distinct file-name stem per prompt (`a-cat`, and `a-cat-2` for another prompt with the same slug)."""
    names, used = {}, set()
    for prompt in prompts:
        stem, n = slug(prompt), 1
        while (stem if n == 1 else f"{stem}-{n}") in used:
            n += 1
        names[prompt] = stem if n == 1 else f"{stem}-{n}"
        used.add(names[prompt])
    return names


# -- ddpo eval --------------------------------------------------------------------------------


@dataclass
class EvalResult:
    out: Path
    report: dict  # what `out` holds
    checkpoint: Path | None  # None: the base model


def eval_run(run_dir: str | Path, checkpoint: str | None = None, base: bool = False, num_per_prompt: int = 50,
             seed: int = 0, out: str | Path | None = None, overrides: list[str] | None = None,
             batch_size: int | None = None, address: str | None = None, progress: bool = True,
             address_source: str = "--address") -> EvalResult:
    """Score a checkpoint (the latest by default; the base model with `base`) with the run's
    reward (or the one `overrides` set): `num_per_prompt` images of each of the run's prompts,
    image i from seed `sample_seed(seed, i)` as `ddpo sample` draws them, sampled here; the
    reward runs on Ray in reward actors behind the reward pool, as in training: on the cluster
    at `address` (`ddpo eval` passes RAY_ADDRESS's inside a job; `address_source` names where it
    was given, for the message when no Ray cluster answers there), on the Ray instance this process
    already has, or else on a local one. Writes the report as JSON to `out` (default
    `RUN_DIR/eval_<checkpoint name>.json`, or `eval_base.json`):
    the reward's mean and standard error overall and per prompt, and the means of the reward's
    numeric extras (a judge's accuracy)."""
    _check_sampling(checkpoint, base, num_per_prompt, batch_size)
    run_dir, config, ckpt = _open_for_sampling(run_dir, overrides, checkpoint, base)
    check_rewards(config.reward)
    out = Path(out) if out is not None else run_dir / f"eval_{ckpt.name if ckpt else 'base'}.json"
    if out.is_dir():
        raise ConfigError(f"--out: '{out}' is a folder; name a .json file")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: the folder '{out.parent}' does not exist")
    epochs = epochs_trained(ckpt) if ckpt else 0
    prompts = config.load_prompts()
    items = [(prompt, i) for prompt in prompts for i in range(num_per_prompt)]
    model = load_model(config, ckpt)
    records = [record for _, _, record in sample_items(model, config, items, seed, batch_size, epochs, progress)]
    del model
    table = _score_on_ray(config, records, address, address_source)
    report = eval_report(table, prompts)
    report = {"checkpoint": ckpt.name if ckpt else None, "epochs_trained": epochs,
              "base_model": config.model.pretrained, "reward": config.reward.label,
              "num_per_prompt": num_per_prompt, "seed": seed, **report}
    out.write_text(json.dumps(report, indent=1) + "\n")
    return EvalResult(out, report, ckpt)


def _score_on_ray(config: Config, records: list[pa.RecordBatch], address: str | None,
                  address_source: str = "--address") -> pa.Table:
    """The records with their rewards (`reward`, `info.<key>`), scored behind the reward pool by
    the reward service `reward.service` names, else by reward actors of its own
    (`cluster.num_reward_actors`, with `cluster.reward`'s resources); with `reward.heldout`, the
    held-out reward's too (`heldout`, `heldout_info.<key>`)."""
    import ray

    from cluster.loop import with_scores
    from cluster.remote import RewardActor, connect_ray, start_actor
    from cluster.reward_pool import RewardPool
    from cluster.reward_service import actor_resources, connect_service

    started = not ray.is_initialized()
    if started:  # with no address, a local instance: loopback only, no dashboard for a short job
        connect_ray(address, address_source, namespace="ddpo", log_to_driver=False, logging_level=logging.WARNING)
    c = config.cluster
    actors, names = [], None  # the reward actors started here (none with a service)
    try:
        if config.reward.service is not None:
            service = connect_service(config.reward)
            scorers, names = service.actors, service.names
        else:
            options, threads = actor_resources(c.reward)
            actors = [start_actor(RewardActor, config.reward, options=options, num_threads=threads,
                                  max_restarts=c.max_restarts) for _ in range(c.num_reward_actors)]
            ray.get([actor.ready.remote() for actor in actors])
            scorers = actors
        pool = RewardPool(scorers, config.reward.label, config.reward.max_batch_images, config.reward.timeout_s,
                          names)
        metadata = config.load_prompt_metadata()  # a JSON Lines prompts file's, for the reward
        trained, heldout = pool.score_all(
            [(ray.put(record), record.num_rows,
              {p: metadata[p] for p in set(record.column("prompt").to_pylist()) if p in metadata})
             for record in records],
            heldout=bool(config.reward.heldout))
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
    return pa.concat_tables([with_scores(record, trained, heldout) for record in records])


def eval_report(table: pa.Table, prompts: list[str]) -> dict:
    """reward_mean, reward_stderr (the standard error of the mean, s / sqrt(n)), reward_std and
    n overall and per prompt, and the reward's numeric extras' means (`reward_summary`)."""
    from cluster.run_dir import reward_summary

    rewards = table.column("reward").to_numpy().astype(np.float64)
    row_prompts = np.array(table.column("prompt").to_pylist(), dtype=object)
    summary = reward_summary(table)
    report = {"reward_mean": float(rewards.mean()), "reward_stderr": stderr(rewards), "reward_std": float(rewards.std()),
              "n": len(rewards), **{k: v for k, v in summary.items() if k not in ("reward_mean", "reward_std")}}
    report["per_prompt"] = {}
    for prompt in prompts:
        values = rewards[row_prompts == prompt]
        report["per_prompt"][prompt] = {"reward_mean": float(values.mean()), "reward_stderr": stderr(values),
                                        "n": len(values)}
    return report


def stderr(values: np.ndarray) -> float:
    """The standard error of the mean, s / sqrt(n) with the sample standard deviation (0 for one value)."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


# -- ddpo export ------------------------------------------------------------------------------


@dataclass
class ExportResult:
    out: Path
    checkpoint: Path
    epochs: int
    merged: bool


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | None = None, merge: bool = False,
               device: str = "cpu", dtype: str = "float32") -> ExportResult:
    """Write a checkpoint as a diffusers folder with a model card (README.md): the LoRA alone
    (`<Pipeline>.from_pretrained(base)` then `.load_lora_weights(out)`), or with `merge` the
    base pipeline with the LoRA fused into its weights (`<Pipeline>.from_pretrained(out)`),
    in `dtype` (float32 by default: it loads without a dtype argument)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: '{out}' exists and is not empty; name a new folder")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"--dtype: must be float32, float16 or bfloat16, got '{dtype}'")
    if merge:
        check_device(device, "--device")
        check_device_here(device, "--device", "use cpu")
    run_dir, config = open_run(run_dir)
    ckpt = find_checkpoint(run_dir, checkpoint)
    epochs = epochs_trained(ckpt)
    if merge:
        _merge(config, ckpt, out, device, dtype)
        info = _pipeline_info(str(out), None)
    else:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ckpt / LORA_FILE, out / LORA_FILE)
        info = _pipeline_info(config.model.pretrained, config.model.revision)
    evals = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else None
    latest = latest_checkpoint(run_dir)
    card = model_card(config, (run_dir / "config.yaml").read_text(), ckpt.name, epochs, evals, merge, out, *info,
                      is_latest=latest is None or latest.name == ckpt.name, dtype=dtype)
    (out / "README.md").write_text(card)
    return ExportResult(out, ckpt, epochs, merge)


def _merge(config: Config, checkpoint: Path, out: Path, device: str, dtype: str) -> None:
    """The base pipeline with the LoRA fused in, through diffusers' own LoRA loader."""
    import torch

    from ddpo.pipeline import load_pipeline

    m = config.model
    pipe = load_pipeline(m.pretrained, m.revision, device, dtype, seed=config.seed).pipe
    with torch.no_grad():
        pipe.load_lora_weights(str(checkpoint))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.to("cpu")
    pipe.save_pretrained(str(out))


def _pipeline_info(source: str, revision: str | None) -> tuple[str, list[str]]:
    """The diffusers pipeline class that loads `source` and the components its folder does
    without that `from_pretrained` wants named (SD3 without T5); ('DiffusionPipeline', []) when
    its model_index.json cannot be read."""
    from ddpo.families import family_named
    from ddpo.pipeline import model_index

    try:
        index = model_index(str(BUILTIN_FOLDERS.get(source, source)), revision)
        cls = family_named(index["_class_name"]).pipeline_class
    except Exception:  # offline hub id, unknown class, ...: the generic loader still works
        return "DiffusionPipeline", []
    optional = set(getattr(cls, "_optional_components", []))
    absent = [name for name, entry in index.items()
              if isinstance(entry, list) and entry[0] is None and name not in optional]
    return cls.__name__, absent


def _task(config: Config) -> str:
    """The model's Hugging Face task tag: a run of clips (sample.num_frames > 1) is text-to-video."""
    return "text-to-video" if config.sample.num_frames > 1 else "text-to-image"


def _describe_base(pretrained: str, revision: str | None, seed: int) -> str:
    if pretrained == BUILTIN_TINY:
        return (f"`{BUILTIN_TINY}`: ddpo-ray's tiny random Stable-Diffusion-shaped pipeline, built in code "
                f"by `ddpo.pipeline.build_tiny_pipeline(seed={seed})` (not a folder)")
    if pretrained in BUILTIN_FOLDERS:
        folder = BUILTIN_FOLDERS[pretrained]
        return (f"`{pretrained}`: the diffusers folder embedded in ddpo-ray, `ddpo/assets/{folder.name}` "
                f"(here `{folder}`)")
    return f"`{pretrained}`" + (f" at revision `{revision}`" if revision else "")


def _is_hub_id(pretrained: str) -> bool:
    return not (pretrained.startswith(("builtin:", ".", "/", "~")) or Path(pretrained).expanduser().exists()
                or pretrained.count("/") > 1)


def _describe_sampler(config: Config) -> str:
    """The run's sampler in words: DDPO's or Flow-GRPO's stochastic steps, an SDE window in the
    flow ODE (Flow-GRPO-Fast, MixGRPO, CPS), or the plain ODE (DiffusionNFT)."""
    s, f = config.sample, config.sample.flow
    head, size = f"{s.num_steps} steps, guidance scale {s.guidance_scale:g}", f"{s.height}x{s.width}"
    if s.num_frames > 1:
        size = f"{s.num_frames} frames of {size}"
    if config.train.algorithm == "diffusion_nft":
        return f"{head}, the deterministic flow ODE (Euler), {size}"
    if f.sde_window:
        first, end = f.sde_window_range
        where = ("its first step drawn per sample batch" if f.sde_window_schedule == "random" else
                 f"sliding by {f.sde_window_shift} every {f.sde_window_interval} epochs from the first")
        return (f"{head}, the flow ODE (Euler) but for a window of {f.sde_window} stochastic `{f.sde_type}` steps "
                f"(noise level {f.noise_level:g}) within steps [{first}, {end}), {where}, {size}")
    return f"{head}, eta {s.ddim.eta:g} (flow noise level {f.noise_level:g}), {size}"


def model_card(config: Config, config_text: str, checkpoint: str, epochs: int, evals: dict | None,
               merged: bool, out: Path, pipeline_class: str, absent: list[str], is_latest: bool = True,
               dtype: str = "float32") -> str:
    """The README.md of an exported folder: Hugging Face model-card front matter, what was
    trained on what, the eval figures, how to load it, and the run's config."""
    m, t = config.model, config.train
    terms = config.reward.terms()
    front = {"library_name": "diffusers"}
    if _is_hub_id(m.pretrained):
        front["base_model"] = m.pretrained
    front["tags"] = list(dict.fromkeys(
        (["lora"] if not merged else []) + ["ddpo", "diffusers", _task(config), "reinforcement-learning",
                                            t.algorithm.replace("_", "-")]
        + [term.name for term in terms if ":" not in term.name]))
    if merged and "base_model" in front:
        front["base_model_relation"] = "finetune"
    reward = "; ".join(
        f"`{term.name}`" + (f" (weight {term.weight:g})" if config.reward.weighted else "")
        + (f", params `{json.dumps(term.params)}`" if term.params else "")
        for term in terms)
    what = (f"the base model with the LoRA of `{checkpoint}` fused into its weights ({dtype})" if merged
            else f"a LoRA (rank {config.lora.rank}, alpha {config.lora.alpha:g}) on the base model's "
                 f"denoiser, `{LORA_FILE}` of checkpoint `{checkpoint}`")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {config.run_name or out.name}: {'merged' if merged else 'LoRA'} from a ddpo-ray run", "",
        f"This folder holds {what}, fine-tuned by reinforcement learning with ddpo-ray.", "",
        f"- **Base model**: {_describe_base(m.pretrained, m.revision, config.seed)}",
        f"- **Reward**: {reward}",
        f"- **Algorithm**: `train.algorithm: {t.algorithm}`, advantages `{config.advantage.mode}`"
        + (f", KL to the base `{t.kl_coef:g}`" if t.kl_coef else ""),
        f"- **Epochs trained**: {epochs} ({config.samples_per_epoch} samples an epoch)"
        + ("" if is_latest else "; not the run's latest checkpoint"),
        f"- **Sampler of the run**: {_describe_sampler(config)}", "",
    ]
    if evals:
        keys = [k for k in evals.get("after", {}) if k in evals.get("before", {})]
        lines += ["## Eval batch", "",
                  "The run's fixed eval batch, before training and after its last epoch"
                  + ("" if is_latest else " (not this checkpoint)") + ":", "",
                  "| metric | before | after |", "| --- | --- | --- |"]
        lines += [f"| {k} | {evals['before'][k]:.4f} | {evals['after'][k]:.4f} |" for k in keys] + [""]
    extra = "".join(f", {name}=None" for name in absent)
    here = str(out.resolve())
    # the weights in their dtype: from_pretrained would load a float16 folder's transformers
    # parts as float16 and its diffusers parts as float32
    if merged:
        load_dtype = "" if dtype == "float32" else f", dtype=torch.{dtype}"
        code = [f'pipe = {pipeline_class}.from_pretrained("{here}"{extra}{load_dtype})']
    elif m.pretrained == BUILTIN_TINY:
        load_dtype = "" if m.dtype == "float32" else m.dtype
        code = ["from ddpo.pipeline import build_tiny_pipeline", "", f"pipe = build_tiny_pipeline(seed={config.seed})"]
        code += [f"pipe.to(dtype=torch.{m.dtype})"] if load_dtype else []
    else:  # in the run's dtype
        load_dtype = m.dtype
        base = str(BUILTIN_FOLDERS.get(m.pretrained, m.pretrained))
        revision = f', revision="{m.revision}"' if m.revision else ""
        code = [f'pipe = {pipeline_class}.from_pretrained("{base}"{revision}{extra}, dtype=torch.{m.dtype})']
    if m.pretrained != BUILTIN_TINY or merged:
        code = [f"from diffusers import {pipeline_class}", ""] + code
    if not merged:
        code += [f'pipe.load_lora_weights("{here}")']
    tokens = m.max_sequence_length or BUILTIN_MAX_SEQUENCE_LENGTH.get(m.pretrained)
    if tokens is not None:  # the pipeline's default length would pad the prompts otherwise than in training
        code += [f"# the run's prompts had {tokens} T5 tokens: pipe(prompt, max_sequence_length={tokens})"]
    lines += ["## How to load", "", "```python"] + (["import torch"] if load_dtype else []) + code
    lines += ["```", "", "## Config of the run", "", "```yaml", config_text.rstrip(), "```", ""]
    return "\n".join(lines)
