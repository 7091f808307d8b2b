"""A denoising step as a Gaussian policy: the action x' ~ N(mean, std^2 I) and its exact log-prob.

DDPO (Black et al. 2023, Sec. 4.3) and Flow-GRPO (Liu et al. 2025, Sec. 4.2) both treat one
stochastic denoising step as an action x_{t-1} ~ N(mu_theta(x_t, t, c), sigma_t^2 I), so that
log p_theta(x_{t-1} | x_t, c) is exact. The steps differ in mu and sigma (DDIM: ddpo/ddim.py;
the flow SDE and CPS: ddpo/flow.py); drawing the action and scoring it is the same, here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor


class GaussianStep(NamedTuple):
    """One stochastic denoising step x_t -> x_{t-1} ~ N(mean, std^2 I) and the log-prob of the
    action taken. `mean` (float32) and `std` (broadcastable to it) give the KL between two
    policies' steps from the same x_t: ||mean_a - mean_b||^2 / (2 std^2)."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor  # [batch]
    mean: torch.Tensor
    std: torch.Tensor


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
    # log N(x; mu, std^2) = -(x - mu)^2 / (2 std^2) - log std - log sqrt(2 pi), per element
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return GaussianStep(prev_sample, reduce_over_latent(log_prob, log_prob_reduction), mean, std)
