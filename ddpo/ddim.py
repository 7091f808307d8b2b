"""The DDIM step as a Gaussian policy, with the exact log-prob of its action.

DDPO (Black et al. 2023, Sec. 4.3) treats each DDIM step with eta > 0 as an action
x_{t-1} ~ N(mu_theta(x_t, t, c), sigma_t^2 I), so log p_theta(x_{t-1} | x_t, c) is exact.
Equation numbers refer to DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"). The
step follows diffusers' `DDIMScheduler.step` and reads the scheduler's own state
(`alphas_cumprod`, `final_alpha_cumprod`, the timestep spacing).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from ddpo.gaussian import GaussianStep, gaussian_step


def _gather(values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[index], broadcast to `like`'s rank ([B] -> [B, 1, 1, 1])."""
    out = values.to(like.device)[index.to(like.device)]
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim)).to(torch.float32)


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
