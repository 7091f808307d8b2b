"""What to sample in an epoch: prompts and seeds per sample batch, each batch with an id.

Deterministic in (config.seed, epoch), so a lag-0 run can be reproduced exactly and a retried
sample task makes the same batch under the same id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddpo.config import Config


@dataclass(frozen=True)
class SampleBatchSpec:
    batch_id: str
    prompts: list[str]
    seeds: list[int]
    sde_start: int = 0  # the first step of the SDE window (sample.flow.sde_window > 0)


def sde_steps(config: Config, sde_start: int) -> range:
    """The indices of the steps a sampler takes stochastically, stores and the learner trains on:
    every step (DDPO, Flow-GRPO), the SDE window's from `sde_start`, or none (DiffusionNFT,
    which samples by the ODE and trains on the final images)."""
    if config.train.algorithm == "diffusion_nft":
        return range(0)
    window = config.sample.flow.sde_window
    return range(sde_start, sde_start + window) if window else range(config.sample.num_steps)


def _window_start(config: Config, epoch: int, rng: np.random.Generator) -> int:
    """Where the SDE window starts this sample batch: drawn uniformly so that the window lies in
    `sample.flow.sde_window_range` (Flow-GRPO-Fast), or sliding from the range's first step by
    `sde_window_shift` every `sde_window_interval` epochs, then staying at its end (MixGRPO)."""
    f = config.sample.flow
    if not f.sde_window:
        return 0
    first, end = f.sde_window_range
    last_start = end - f.sde_window
    if f.sde_window_schedule == "random":
        return int(rng.integers(first, last_start + 1))
    return min(first + f.sde_window_shift * (epoch // f.sde_window_interval), last_start)


def _group_prompts(config: Config, prompts: list[str], rng: np.random.Generator) -> list[str]:
    """GRPO's epoch (`advantage.mode: group`): groups of `group_size` copies of one prompt, the
    groups' prompts all different while the prompt list lasts."""
    size = config.advantage.group_size
    num_groups = config.samples_per_epoch // size
    picks = np.concatenate([rng.permutation(len(prompts)) for _ in range(-(-num_groups // len(prompts)))])
    return [prompts[i] for i in picks[:num_groups] for _ in range(size)]


def epoch_plan(config: Config, prompts: list[str], epoch: int) -> list[SampleBatchSpec]:
    rng = np.random.default_rng([config.seed, epoch])
    size = config.sample.batch_size
    grouped = _group_prompts(config, prompts, rng) if config.advantage.mode == "group" else None
    specs = []
    for b in range(config.sample.num_batches_per_epoch):
        first = (epoch * config.sample.num_batches_per_epoch + b) * size
        specs.append(SampleBatchSpec(
            batch_id=f"e{epoch}-b{b}",
            prompts=(grouped[b * size:(b + 1) * size] if grouped is not None
                     else [prompts[i] for i in rng.integers(0, len(prompts), size)]),
            seeds=[config.seed * 1_000_000_007 + first + i for i in range(size)],
            sde_start=_window_start(config, epoch, rng),
        ))
    return specs


def fresh_batches(batch_versions: list[int], policy_version: int, max_policy_lag: int) -> list[int]:
    """Indices of the batches made at most `max_policy_lag` versions before `policy_version`;
    the others are stale and get dropped."""
    return [i for i, v in enumerate(batch_versions) if policy_version - v <= max_policy_lag]


def eval_plan(config: Config, prompts: list[str]) -> SampleBatchSpec:
    """The fixed batch sampled before training and after it (the before/after grid): the first
    prompts in order, repeated to fill `config.eval_images`, with seeds far above any epoch's."""
    num_images = config.eval_images
    return SampleBatchSpec(
        batch_id="eval",
        prompts=[prompts[i % len(prompts)] for i in range(num_images)],
        seeds=[2**62 + config.seed * num_images + i for i in range(num_images)],
        sde_start=config.sample.flow.sde_window_range[0],
    )
