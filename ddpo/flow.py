"""Flow matching as a Markov decision process: the Flow-GRPO SDE step, with an exact log-prob.

The flow-matching twin of `ddpo.ddim.ddim_step_with_logprob`. Flow-GRPO (Liu et al. 2025,
"Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470, Sec. 4.2) turns the
deterministic flow ODE dx = v dt into the SDE

    dx = [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t dw,   sigma_t = a sqrt(t / (1 - t)),

which has the same marginals as the ODE (t = sigma runs from 1 = noise down to 0 = data, so dt < 0).
Its Euler-Maruyama step x_{t+dt} ~ N(mu_theta(x_t, t, c), sigma_t^2 |dt| I) is a Gaussian policy,
so log p_theta(x_{t+dt} | x_t, c) is exact. `noise_level` is a in sigma_t.

Coefficients-preserving sampling (CPS; Wang & Yu 2025, arXiv 2509.05952, Eq. 8) is another
Gaussian step with the same marginals: from the predicted x_0 = x_t - t v and noise
eps = x_t + (1 - t) v,

    x_{t'} = (1 - t') x_0 + sqrt(t'^2 - s^2) eps + s z,   s = t' sin(a pi / 2),  z ~ N(0, I),

whose coefficients of x_0 and of the (unit) noise are exactly those of the marginal at t', so it
leaves no excess noise in the image. Outside an SDE window the step is the ODE's Euler step
x_{t'} = x_t + (t' - t) v, diffusers' FlowMatchEulerDiscreteScheduler.step.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddpo.gaussian import GaussianStep, gaussian_step


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


def _sigmas_of(scheduler: FlowMatchEulerDiscreteScheduler, timestep, sample: torch.Tensor):
    """(t, t') of each sample's step as float32 tensors shaped [B, 1, ...], and the schedule's
    sigmas; t' is the next sigma (diffusers appends a terminal 0)."""
    if getattr(scheduler, "num_inference_steps", None) is None or scheduler.timesteps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    if scheduler.config.get("invert_sigmas", False):
        raise ValueError("schedulers with invert_sigmas=True are not supported")
    batch, device = sample.shape[0], sample.device
    index = _schedule_index(scheduler, timestep, batch, device)
    sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
    view = (batch,) + (1,) * (sample.ndim - 1)
    return sigmas[index].reshape(view), sigmas[index + 1].reshape(view), sigmas


def ode_step(scheduler: FlowMatchEulerDiscreteScheduler, model_output: torch.Tensor, timestep,
             sample: torch.Tensor) -> torch.Tensor:
    """The flow ODE's Euler step x_{t'} = x_t + (t' - t) v, in float32 and returned in the
    sample's dtype, as FlowMatchEulerDiscreteScheduler.step computes it."""
    sigma, sigma_next, _ = _sigmas_of(scheduler, timestep, sample)
    return (sample.to(torch.float32) + (sigma_next - sigma) * model_output.to(torch.float32)).to(sample.dtype)


def sde_step_with_logprob(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    log_prob_reduction: str = "mean",
    sde_type: str = "flow_grpo",
) -> GaussianStep:
    """One SDE step x_t -> x_{t+dt} and log p(x_{t+dt} | x_t, c) of shape [batch].

    `model_output` is the velocity v (noise - data) predicted at `timestep`, a value of
    `scheduler.timesteps`, scalar or one per sample ([batch]). Samples x_{t+dt} from the step's
    Gaussian, or, when `prev_sample` is given, scores it instead. The log density is averaged over
    the latent's elements (`log_prob_reduction="mean"`, the public implementation's convention) or
    summed (`"sum"`, the true log density). Works for any latent rank ([B, C, h, w], [B, seq, C]).

    Returns (prev_sample in the sample's dtype, log_prob [B] float32, prev_sample_mean float32,
    step_std float32 shaped [B, 1, ...]); the KL to a reference policy of the same step is
    ||mu_theta - mu_ref||^2 / (2 step_std^2) per element. `sde_type` is Flow-GRPO's SDE
    (`flow_grpo`) or coefficients-preserving sampling (`cps`), whose last step (t' = 0) has no noise.
    """
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 (got {noise_level}): at 0 the step is deterministic "
                         "and its log-prob infinite")
    if log_prob_reduction not in ("mean", "sum"):
        raise ValueError(f"log_prob_reduction must be 'mean' or 'sum', got '{log_prob_reduction}'")
    if sde_type not in ("flow_grpo", "cps"):
        raise ValueError(f"sde_type must be 'flow_grpo' or 'cps', got '{sde_type}'")
    x_t = sample.to(torch.float32)
    v = model_output.to(torch.float32)

    # 1. t = sigma_i and t + dt = sigma_{i+1} (diffusers appends a terminal sigma 0), dt < 0
    sigma, sigma_next, sigmas = _sigmas_of(scheduler, timestep, sample)
    dt = sigma_next - sigma
    if sde_type == "cps":
        if bool((sigma_next == 0).any()):
            raise ValueError("the CPS step to t' = 0 has no noise and no log-prob: keep the last step out of "
                             "the SDE window")
        # CPS: s = t' sin(a pi / 2); mu = (1 - t') x_0 + sqrt(t'^2 - s^2) eps, with x_0 = x - t v and
        # eps = x + (1 - t) v
        step_std = sigma_next * math.sin(noise_level * math.pi / 2)
        x0, eps = x_t - sigma * v, x_t + (1 - sigma) * v
        prev_sample_mean = (1 - sigma_next) * x0 + torch.sqrt(sigma_next**2 - step_std**2) * eps
        return gaussian_step(prev_sample_mean, step_std, sample.dtype, prev_sample, generator, log_prob_reduction)

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
