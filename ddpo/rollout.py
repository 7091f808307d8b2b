"""The rollout: a batch of denoising trajectories from a model family, and the log-probs of
stored transitions under the current weights.

Denoising is a Markov decision process (DDPO, Black et al. 2023, Sec. 4.3): the state is
(x_t, t, c), the action x_{t-1}, the policy the family's Gaussian step (ddpo/ddim.py,
ddpo/flow.py). The loop below is the same for every family; what differs (conditioning,
guidance, the step, the latents' shape and dtype, decoding) is the family's (ddpo/families/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ddpo.gaussian import GaussianStep
from ddpo.media import Media

if TYPE_CHECKING:
    from ddpo.config import SampleConfig
    from ddpo.families import Conditioning, ModelFamily


@dataclass
class Trajectories:
    """A batch of denoising trajectories, as the sampler made them: the stochastic steps only
    (all of them, an SDE window's, or none when every step is the ODE's)."""

    prompts: list[str]
    seeds: list[int]
    latents: torch.Tensor  # [B, S+1]: x before the first of the S stochastic steps, ..., x after the
    #                        last (S = 0: x_0 alone), in the family's latent dtype
    log_probs: torch.Tensor | None  # [B, S]: log p(x_{t-1} | x_t, c) of each stochastic step, float32
    timesteps: torch.Tensor  # [B, S]: the timestep t of each stochastic step (DDIM: int64; flow:
    #                          float32); with S = 0, the whole schedule
    media: Media  # the samples decoded from x_0: images, or a video family's frames


@torch.no_grad()
def sample_trajectories(model: ModelFamily, prompts: list[str], seeds: list[int], sample: SampleConfig,
                        sde_steps: range | None = None) -> Trajectories:
    """Run the family's sampler; the steps at the indices `sde_steps` (consecutive; None: all) are
    stochastic with per-step log-probs and stored, the others are the deterministic ODE step
    (flow families). Sample i depends only on (prompts[i], seeds[i]) and the weights: its initial
    noise and every step's noise come from its own generator, so the same sample comes out
    whatever batch it is drawn in."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    s = sample
    use_cfg = model.uses_cfg(s.guidance_scale)
    cond, negative = model.conditioning(list(prompts), with_negative=use_cfg)
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
    timesteps = model.set_timesteps(s.num_steps, s.height, s.width)
    sde_steps = range(len(timesteps)) if sde_steps is None else sde_steps
    latents = model.initial_latents(generators, s.height, s.width, s.num_frames)  # x_T

    stored, log_probs = [], []
    for i, t in enumerate(timesteps):
        if i == sde_steps.start and len(sde_steps):
            stored.append(latents)
        output = model.predict(latents, t, cond, negative, s.guidance_scale)
        if i in sde_steps:  # the action x_{t-1} ~ pi(. | x_t, c) and its log-prob
            latents, log_prob, _, _ = model.step(output, t, latents, s, generator=generators)
            stored.append(latents)
            log_probs.append(log_prob)
        else:
            latents = model.ode_step(output, t, latents)

    stored_timesteps = timesteps[sde_steps.start:sde_steps.stop] if len(sde_steps) else timesteps
    return Trajectories(
        prompts=list(prompts),
        seeds=[int(seed) for seed in seeds],
        latents=(torch.stack(stored, dim=1) if log_probs else latents[:, None]).cpu(),
        log_probs=torch.stack(log_probs, dim=1).float().cpu() if log_probs else None,
        timesteps=stored_timesteps.repeat(len(prompts), 1).cpu(),
        media=model.decode(latents),
    )


def step_log_prob(model: ModelFamily, latents: torch.Tensor, next_latents: torch.Tensor, timesteps: torch.Tensor,
                  cond: Conditioning, negative: Conditioning | None, sample: SampleConfig) -> GaussianStep:
    """The Gaussian steps x_t -> x_{t-1} of stored transitions under the current weights, with
    log p_theta(x_{t-1} | x_t, c) (differentiable). The scheduler must hold the sampling run's
    timesteps (`model.set_timesteps`)."""
    output = model.predict(latents, timesteps, cond, negative, sample.guidance_scale)
    return model.step(output, timesteps, latents, sample, prev_sample=next_latents)
