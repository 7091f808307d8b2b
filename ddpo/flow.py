"""Flow matching as a Markov decision process: the Flow-GRPO SDE step, with an exact log-prob.

The flow-matching twin of `ddpo.diffusion.ddim_step_with_logprob`. Flow-GRPO (Liu et al. 2025,
"Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470, Sec. 4.2) turns the
deterministic flow ODE dx = v dt into the SDE

    dx = [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t dw,   sigma_t = a sqrt(t / (1 - t)),

which has the same marginals as the ODE (t = sigma runs from 1 = noise down to 0 = data, so dt < 0).
Its Euler-Maruyama step x_{t+dt} ~ N(mu_theta(x_t, t, c), sigma_t^2 |dt| I) is a Gaussian policy,
so log p_theta(x_{t+dt} | x_t, c) is exact. `noise_level` is a in sigma_t.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddpo.diffusion import GaussianStep, gaussian_step


def _schedule_index(scheduler: FlowMatchEulerDiscreteScheduler, timestep, batch: int, device) -> torch.Tensor:
    """The index in `scheduler.timesteps` of each sample's timestep ([batch], int64)."""
    schedule = scheduler.timesteps.to(device=device, dtype=torch.float32)
    timestep = torch.as_tensor(timestep, device=device).to(torch.float32).reshape(-1)
    if timestep.numel() not in (1, batch):
        raise ValueError(f"expected one timestep or one per sample ({batch}), got {timestep.numel()}")
    timestep = timestep.expand(batch)
    # timesteps are float32 schedule values: match them up to float32 rounding
    matches = torch.isclose(timestep[:, None], schedule[None, :], rtol=1e-6, atol=1e-5)
    found = matches.any(dim=1)
    if not bool(found.all()):
        missing = sorted({float(t) for t in timestep[~found].tolist()})
        raise ValueError(f"timestep(s) {missing} not on the scheduler's schedule "
                         f"({len(schedule)} steps from {float(schedule[0]):g} to {float(schedule[-1]):g})")
    return matches.to(torch.int64).argmax(dim=1)  # first match


def sde_step_with_logprob(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    log_prob_reduction: str = "mean",
) -> GaussianStep:
    """One SDE step x_t -> x_{t+dt} and log p(x_{t+dt} | x_t, c) of shape [batch].

    `model_output` is the velocity v (noise - data) predicted at `timestep`, a value of
    `scheduler.timesteps`, scalar or one per sample ([batch]). Samples x_{t+dt} from the step's
    Gaussian, or, when `prev_sample` is given, scores it instead. The log density is averaged over
    the latent's elements (`log_prob_reduction="mean"`, the public implementation's convention) or
    summed (`"sum"`, the true log density). Works for any latent rank ([B, C, h, w], [B, seq, C]).

    Returns (prev_sample in the sample's dtype, log_prob [B] float32, prev_sample_mean float32,
    step_std float32 shaped [B, 1, ...]); the KL to a reference policy of the same step is
    ||mu_theta - mu_ref||^2 / (2 step_std^2) per element.
    """
    if getattr(scheduler, "num_inference_steps", None) is None or scheduler.timesteps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 (got {noise_level}): at 0 the step is deterministic "
                         "and its log-prob infinite")
    if log_prob_reduction not in ("mean", "sum"):
        raise ValueError(f"log_prob_reduction must be 'mean' or 'sum', got '{log_prob_reduction}'")
    if scheduler.config.get("invert_sigmas", False):
        raise ValueError("schedulers with invert_sigmas=True are not supported")

    batch, device = sample.shape[0], sample.device
    index = _schedule_index(scheduler, timestep, batch, device)
    x_t = sample.to(torch.float32)
    v = model_output.to(torch.float32)

    # 1. t = sigma_i and t + dt = sigma_{i+1} (diffusers appends a terminal sigma 0), dt < 0
    sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
    view = (batch,) + (1,) * (x_t.ndim - 1)
    sigma = sigmas[index].reshape(view)
    sigma_next = sigmas[index + 1].reshape(view)
    dt = sigma_next - sigma

    # 2. sigma_t = a sqrt(t / (1 - t)); at t = 1 (the first step) 1 - t uses the schedule's second
    #    sigma instead, so it stays finite (as Flow-GRPO's code does)
    sigma_max = sigmas[1]
    std_dev_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma)))

    # 3. Euler-Maruyama mean: mu = x + [v + sigma_t^2/(2t) (x + (1 - t) v)] dt
    #    = x (1 + sigma_t^2/(2t) dt) + v (1 + sigma_t^2 (1 - t)/(2t)) dt
    prev_sample_mean = (
        x_t * (1 + std_dev_t**2 / (2 * sigma) * dt)
        + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    # 4. the step's standard deviation, sigma_t sqrt(|dt|)
    step_std = std_dev_t * torch.sqrt(-dt)

    # 5. the action x_{t+dt} = mu + sigma_t sqrt(|dt|) eps and log N(x_{t+dt}; mu, step_std^2 I)
    return gaussian_step(prev_sample_mean, step_std, sample.dtype, prev_sample, generator, log_prob_reduction)
