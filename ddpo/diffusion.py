"""Denoising as a Markov decision process: the DDIM step as a Gaussian policy, and trajectories.

DDPO (Black et al. 2023, Sec. 4.3) treats each DDIM step with eta > 0 as an action
x_{t-1} ~ N(mu_theta(x_t, t, c), sigma_t^2 I), so log p_theta(x_{t-1} | x_t, c) is exact.
Equation numbers refer to DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor


def _gather(values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[index], broadcast to `like`'s rank ([B] -> [B, 1, 1, 1])."""
    out = values.to(like.device)[index.to(like.device)]
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim)).to(torch.float32)


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    log_prob_reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} and log p(x_{t-1} | x_t, c) of shape [batch].

    Samples x_{t-1} from the step's Gaussian, or, when `prev_sample` is given, scores it instead.
    `timestep` may be a scalar or one timestep per sample ([batch]). The log density is averaged
    over the latent's elements (`log_prob_reduction="mean"`, the public implementation's
    convention) or summed (`"sum"`, the true log density).
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
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

    # 3. predicted x_0 ("predicted x_0" in formula (12)) and the noise it implies
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_original_sample = (x_t - beta_prod_t.sqrt() * eps) / alpha_prod_t.sqrt()
        pred_epsilon = eps
    elif prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t.sqrt() * x_t - beta_prod_t.sqrt() * eps
        pred_epsilon = alpha_prod_t.sqrt() * eps + beta_prod_t.sqrt() * x_t
    elif prediction_type == "sample":
        pred_original_sample = eps
        pred_epsilon = (x_t - alpha_prod_t.sqrt() * pred_original_sample) / beta_prod_t.sqrt()
    else:
        raise ValueError(f"unsupported scheduler prediction_type '{prediction_type}'")
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        pred_original_sample = pred_original_sample.clamp(-r, r)

    # 4. sigma_t = eta * sqrt((1 - a_{t-1}) / (1 - a_t)) * sqrt(1 - a_t / a_{t-1}), formula (16)
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance.sqrt()

    # 5. mu = sqrt(a_{t-1}) x_0 + sqrt(1 - a_{t-1} - sigma_t^2) eps, formula (12)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2).clamp(min=0).sqrt() * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev.sqrt() * pred_original_sample + pred_sample_direction

    # 6. the action x_{t-1} ~ N(mu, sigma_t^2 I), kept in the sample's dtype: its log-prob is
    #    computed on the stored value, so recomputing it later gives the same number
    if prev_sample is None:
        noise = randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
        prev_sample = (prev_sample_mean + std_dev_t * noise).to(sample.dtype)
    x_prev = prev_sample.detach().to(torch.float32)

    # 7. log N(x_{t-1}; mu, sigma_t^2 I), per element, reduced over all but the batch dim
    log_prob = (
        -((x_prev - prev_sample_mean) ** 2) / (2 * std_dev_t**2)
        - torch.log(std_dev_t)
        - math.log(math.sqrt(2 * math.pi))
    )
    dims = tuple(range(1, log_prob.ndim))
    log_prob = log_prob.mean(dim=dims) if log_prob_reduction == "mean" else log_prob.sum(dim=dims)
    return prev_sample, log_prob


def predict_noise(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """The UNet's prediction, with classifier-free guidance when `negative_prompt_embeds` is given:
    eps = eps_uncond + w (eps_cond - eps_uncond) (Ho & Salimans 2022)."""
    timestep = torch.as_tensor(timestep, device=latents.device).expand(latents.shape[0])
    dtype = prompt_embeds.dtype
    if negative_prompt_embeds is None:
        return unet(latents.to(dtype), timestep, encoder_hidden_states=prompt_embeds).sample
    noise_pred = unet(
        torch.cat([latents, latents]).to(dtype),
        torch.cat([timestep, timestep]),
        encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
    ).sample
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    return noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)


def encode_prompts(pipe, prompts: list[str], with_negative: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLIP text embeddings of the prompts (and of the empty prompt, for guidance)."""
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
        prompts, pipe.unet.device, num_images_per_prompt=1, do_classifier_free_guidance=with_negative
    )
    return prompt_embeds, negative_prompt_embeds if with_negative else None


@dataclass
class Trajectories:
    """A batch of denoising trajectories, as the sampler made them."""

    prompts: list[str]
    seeds: list[int]
    latents: torch.Tensor  # [B, T+1, C, h, w]: x_T, ..., x_0 in the sampling dtype
    log_probs: torch.Tensor  # [B, T]: log p(x_{t-1} | x_t, c) at each step, float32
    timesteps: torch.Tensor  # [B, T]: the timestep t of each step, int64
    images: np.ndarray  # [B, H, W, 3] uint8, decoded from x_0


@torch.no_grad()
def decode_images(pipe, latents: torch.Tensor) -> np.ndarray:
    """x_0 latents -> uint8 images [B, H, W, 3] through the VAE."""
    vae = pipe.vae
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    image = (image.float() / 2 + 0.5).clamp(0, 1)
    return (image.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()


@torch.no_grad()
def sample_trajectories(
    pipe,
    prompts: list[str],
    seeds: list[int],
    num_steps: int,
    guidance_scale: float,
    eta: float,
    height: int,
    width: int,
    log_prob_reduction: str = "mean",
) -> Trajectories:
    """Run the DDIM sampler with per-step log-probs. Sample i depends only on (prompts[i],
    seeds[i]) and the weights: its initial noise and every step's noise come from its own
    generator, so the same sample comes out whatever batch it is drawn in."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    unet, scheduler = pipe.unet, pipe.scheduler
    device = unet.device
    use_cfg = guidance_scale > 1.0
    prompt_embeds, negative_prompt_embeds = encode_prompts(pipe, prompts, with_negative=use_cfg)

    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    scale = pipe.vae_scale_factor
    shape = (len(prompts), unet.config.in_channels, height // scale, width // scale)
    latents = randn_tensor(shape, generator=generators, device=device, dtype=prompt_embeds.dtype)
    scheduler.set_timesteps(num_steps, device=device)
    latents = latents * scheduler.init_noise_sigma

    all_latents, all_log_probs = [latents], []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        noise_pred = predict_noise(
            unet, model_input, t, prompt_embeds, negative_prompt_embeds, guidance_scale
        )
        latents, log_prob = ddim_step_with_logprob(
            scheduler, noise_pred, t, latents, eta=eta, generator=generators,
            log_prob_reduction=log_prob_reduction,
        )
        all_latents.append(latents)
        all_log_probs.append(log_prob)

    return Trajectories(
        prompts=list(prompts),
        seeds=[int(s) for s in seeds],
        latents=torch.stack(all_latents, dim=1).cpu(),
        log_probs=torch.stack(all_log_probs, dim=1).float().cpu(),
        timesteps=scheduler.timesteps.repeat(len(prompts), 1).long().cpu(),
        images=decode_images(pipe, latents),
    )


def step_log_prob(
    pipe,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    guidance_scale: float,
    eta: float,
    log_prob_reduction: str = "mean",
) -> torch.Tensor:
    """log p_theta(x_{t-1} | x_t, c) of stored steps under the current weights (differentiable).
    The scheduler must hold the sampling run's `set_timesteps(num_steps)`."""
    model_input = pipe.scheduler.scale_model_input(latents, timesteps)
    noise_pred = predict_noise(
        pipe.unet, model_input, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale
    )
    _, log_prob = ddim_step_with_logprob(
        pipe.scheduler, noise_pred, timesteps, latents, eta=eta, prev_sample=next_latents,
        log_prob_reduction=log_prob_reduction,
    )
    return log_prob
