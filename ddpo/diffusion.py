"""Denoising as a Markov decision process: the DDIM step as a Gaussian policy, and trajectories.

DDPO (Black et al. 2023, Sec. 4.3) treats each DDIM step with eta > 0 as an action
x_{t-1} ~ N(mu_theta(x_t, t, c), sigma_t^2 I), so log p_theta(x_{t-1} | x_t, c) is exact.
Equation numbers refer to DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

if TYPE_CHECKING:
    from ddpo.config import SampleConfig
    from ddpo.families import Conditioning, ModelFamily


def _gather(values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[index], broadcast to `like`'s rank ([B] -> [B, 1, 1, 1])."""
    out = values.to(like.device)[index.to(like.device)]
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim)).to(torch.float32)


class GaussianStep(NamedTuple):
    """One stochastic denoising step x_t -> x_{t-1} ~ N(mean, std^2 I) and the log-prob of the
    action taken. `mean` (float32) and `std` (broadcastable to it) give the KL between two
    policies' steps from the same x_t: ||mean_a - mean_b||^2 / (2 std^2)."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor  # [batch]
    mean: torch.Tensor
    std: torch.Tensor


def check_ddim_scheduler(scheduler: DDIMScheduler) -> None:
    """Refuse, in one line, a scheduler config that `ddim_step_with_logprob` would not step as
    diffusers' `DDIMScheduler.step` does."""
    config = scheduler.config
    if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"scheduler prediction_type '{config.prediction_type}' is not supported: the DDIM step "
                         "takes 'epsilon', 'v_prediction' or 'sample'")
    if config.set_alpha_to_one:
        raise ValueError("scheduler set_alpha_to_one: true makes the last DDIM step deterministic (sigma 0), "
                         "which has no log-prob; set it to false in the scheduler's config")
    if config.thresholding:
        raise ValueError("scheduler thresholding: true is not supported: dynamic thresholding is for pixel-space "
                         "models (diffusers: unsuitable for latent-space ones such as Stable Diffusion); set it "
                         "to false in the scheduler's config")


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    log_prob_reduction: str = "mean",
) -> GaussianStep:
    """One DDIM step x_t -> x_{t-1} and log p(x_{t-1} | x_t, c) of shape [batch].

    Samples x_{t-1} from the step's Gaussian, or, when `prev_sample` is given, scores it instead.
    `timestep` may be a scalar or one timestep per sample ([batch]). The log density is averaged
    over the latent's elements (`log_prob_reduction="mean"`, the public implementation's
    convention) or summed (`"sum"`, the true log density).
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    check_ddim_scheduler(scheduler)
    batch = sample.shape[0]
    timestep = torch.as_tensor(timestep, device=sample.device).long().expand(batch)
    x_t = sample.to(torch.float32)
    eps = model_output.to(torch.float32)

    # 1. previous timestep t-1 on the inference schedule (the scheduler's own spacing)
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps

    # 2. alpha-bar_t and alpha-bar_{t-1}; past the first step, the scheduler's final alpha-bar
    alpha_prod_t = _gather(scheduler.alphas_cumprod, timestep, x_t)
    has_prev = (prev_timestep >= 0).reshape(-1, *([1] * (x_t.ndim - 1)))
    alpha_prod_t_prev = torch.where(
        has_prev,
        _gather(scheduler.alphas_cumprod, prev_timestep.clamp(min=0), x_t),
        torch.as_tensor(float(scheduler.final_alpha_cumprod), device=x_t.device),
    )
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev

    # 3. predicted x_0 ("predicted x_0" of formula (12)) and the noise it implies, from the model's
    #    eps, its v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (Salimans & Ho 2022, Sec. 4), or x_0 itself
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_original_sample = (x_t - beta_prod_t.sqrt() * eps) / alpha_prod_t.sqrt()
        pred_epsilon = eps
    elif prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t.sqrt() * x_t - beta_prod_t.sqrt() * eps
        pred_epsilon = alpha_prod_t.sqrt() * eps + beta_prod_t.sqrt() * x_t
    else:  # "sample" (check_ddim_scheduler refused the rest)
        pred_original_sample = eps
        pred_epsilon = (x_t - alpha_prod_t.sqrt() * pred_original_sample) / beta_prod_t.sqrt()
    # x_0 clipped to [-r, r] as the scheduler's `clip_sample` asks (the direction keeps the
    # unclipped eps, as diffusers' step does by default)
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        pred_original_sample = pred_original_sample.clamp(-r, r)

    # 4. sigma_t = eta * sqrt((1 - a_{t-1}) / (1 - a_t)) * sqrt(1 - a_t / a_{t-1}), formula (16)
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance.sqrt()

    # 5. mu = sqrt(a_{t-1}) x_0 + sqrt(1 - a_{t-1} - sigma_t^2) eps, formula (12)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2).clamp(min=0).sqrt() * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev.sqrt() * pred_original_sample + pred_sample_direction

    # 6. the action x_{t-1} ~ N(mu, sigma_t^2 I) and its log-prob
    return gaussian_step(prev_sample_mean, std_dev_t, sample.dtype, prev_sample, generator, log_prob_reduction)


def reduce_over_latent(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-element values reduced over all but the batch dim: `mean` (the public DDPO
    implementation's convention) or `sum`."""
    dims = tuple(range(1, values.ndim))
    return values.mean(dim=dims) if reduction == "mean" else values.sum(dim=dims)


def gaussian_step(mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype, prev_sample: torch.Tensor | None,
                  generator, log_prob_reduction: str) -> GaussianStep:
    """The action x' ~ N(mean, std^2 I) of a step (DDIM's or the flow SDE's), kept in `dtype`, and
    log N(x'; mean, std^2 I) computed on that stored value, so recomputing it later gives the
    same number. With `prev_sample` given, that action is scored instead of drawn."""
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = (mean + std * noise).to(dtype)
    x = prev_sample.detach().to(torch.float32)
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return GaussianStep(prev_sample, reduce_over_latent(log_prob, log_prob_reduction), mean, std)


@dataclass
class Trajectories:
    """A batch of denoising trajectories, as the sampler made them: the stochastic steps only
    (all of them, an SDE window's, or none when every step is the ODE's)."""

    prompts: list[str]
    seeds: list[int]
    latents: torch.Tensor  # [B, S+1]: x before the first of the S stochastic steps, ..., x after the
    #                        last (S = 0: x_0 alone), in the sampling dtype
    log_probs: torch.Tensor | None  # [B, S]: log p(x_{t-1} | x_t, c) of each stochastic step, float32
    timesteps: torch.Tensor  # [B, S]: the timestep t of each stochastic step (DDIM: int64; flow:
    #                          float32); with S = 0, the whole schedule
    images: np.ndarray  # [B, H, W, 3] uint8, decoded from x_0


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
    latents = model.initial_latents(generators, s.height, s.width, dtype=cond["prompt_embeds"].dtype)

    stored, log_probs = [], []
    for i, t in enumerate(timesteps):
        if i == sde_steps.start and len(sde_steps):
            stored.append(latents)
        output = model.predict(latents, t, cond, negative, s.guidance_scale)
        if i in sde_steps:
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
        images=model.decode(latents),
    )


def step_log_prob(model: ModelFamily, latents: torch.Tensor, next_latents: torch.Tensor, timesteps: torch.Tensor,
                  cond: Conditioning, negative: Conditioning | None, sample: SampleConfig) -> GaussianStep:
    """The Gaussian steps x_t -> x_{t-1} of stored transitions under the current weights, with
    log p_theta(x_{t-1} | x_t, c) (differentiable). The scheduler must hold the sampling run's
    timesteps (`model.set_timesteps`)."""
    output = model.predict(latents, timesteps, cond, negative, sample.guidance_scale)
    return model.step(output, timesteps, latents, sample, prev_sample=next_latents)
