"""The policy-gradient losses of DDPO (Black et al. 2023, Sec. 4) and its RWR baseline.

Each loss takes per-(sample, step) tensors of shape [B] and returns (loss, diagnostics).
"""

from __future__ import annotations

import torch

from ddpo.gaussian import reduce_over_latent


def ddpo_sf_loss(log_prob, advantages, importance_weight):
    """DDPO-SF (REINFORCE, Eq. 3): L = -E[w * A * log p_theta(x_{t-1} | x_t, c)].
    w is the truncated importance weight of `importance_weight()` (exactly 1 on-policy)."""
    loss = (-advantages * importance_weight * log_prob).mean()
    return loss, {}


def ddpo_is_loss(log_prob, log_prob_prox, advantages, importance_weight, clip_range):
    """DDPO-IS (Eq. 4) with the PPO clip, in its decoupled form (Hilton et al. 2021):
        ratio = p_theta / p_prox
        L = E[w * max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))]
    where p_prox is the policy at the start of this update and w = min(c, p_prox / p_behaviour).
    On-policy (lag 0) p_prox = p_behaviour and w = 1: the paper's loss exactly."""
    ratio = torch.exp(log_prob - log_prob_prox)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = (importance_weight * torch.maximum(unclipped, clipped)).mean()
    with torch.no_grad():
        diagnostics = {
            "approx_kl": 0.5 * ((log_prob - log_prob_prox) ** 2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
        }
    return loss, diagnostics


def kl_to_reference(mean, mean_ref, std, reduction: str = "mean"):
    """KL(p_theta || p_ref) of one step's two Gaussians, which share their std sigma (it depends
    on the schedule only): KL = ||mu_theta - mu_ref||^2 / (2 sigma^2), averaged (`mean`, as the
    log-prob) or summed over the latent's elements; shape [B]."""
    return reduce_over_latent((mean - mean_ref) ** 2 / (2 * std**2), reduction)


def importance_weight(log_prob_prox, log_prob_behaviour, cap):
    """Truncated importance weight w = min(c, p_prox / p_behaviour) (V-trace's rho-bar)."""
    return torch.clamp(torch.exp(log_prob_prox - log_prob_behaviour), max=cap)


def rwr_weights(rewards, beta=None, top_fraction=None):
    """Reward-weighted regression weights (Sec. 4.1), normalised to mean 1 over the batch:
    exp(r / beta), or, sparse, 1 for the top `top_fraction` of rewards and 0 elsewhere."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if top_fraction is not None:
        k = max(1, round(top_fraction * len(rewards)))
        threshold = torch.topk(rewards, k).values.min()
        weights = (rewards >= threshold).float()
    else:
        weights = torch.softmax(rewards / beta, dim=0)
    return weights * len(rewards) / weights.sum()


def rwr_loss(noise_pred, noise, weights):
    """RWR: the denoising loss ||eps_theta(x_t, t, c) - eps||^2 (per sample, mean over
    elements) weighted per sample."""
    per_sample = ((noise_pred.float() - noise.float()) ** 2).mean(dim=tuple(range(1, noise.ndim)))
    return (weights * per_sample).mean(), {}


def nft_optimality(advantages, adv_clip_max):
    """DiffusionNFT's optimality probability r in [0, 1] of each sample (Zheng et al. 2025):
    its normalised reward mapped linearly, r = 1/2 + clip(A, -c, c) / (2c)."""
    return (0.5 + advantages.clamp(-adv_clip_max, adv_clip_max) / (2 * adv_clip_max)).clamp(0, 1)


def diffusion_nft_loss(v_theta, v_old, v_target, sigma, r, beta, adv_clip_max, adaptive_weight=True):
    """DiffusionNFT's negative-aware fine-tuning loss (Zheng et al. 2025, arXiv 2509.16117), per sample [B]
    then meaned:
        v+ = (1 - beta) v_old + beta v_theta,   v- = (1 + beta) v_old - beta v_theta
        L = c / beta * E[ r ||v+ - v||^2 + (1 - r) ||v- - v||^2 ]
    with v = eps - x_0 the flow-matching target at x_t = (1 - sigma) x_0 + sigma eps, v_old the old
    policy's velocity (no gradient) and c = adv_clip_max, as the public code scales it. With
    `adaptive_weight` (the public code's default) each squared error is taken on the predicted
    x_0 = x_t - sigma v+-, whose error is sigma (v - v+-), and divided by that error's mean absolute
    value (detached): the gradient, 2 e / mean|e| per element, is of unit scale whatever sigma or
    the size of the error."""
    dims = tuple(range(1, v_theta.ndim))
    v_old = v_old.detach()
    v_pos = (1 - beta) * v_old + beta * v_theta
    v_neg = (1 + beta) * v_old - beta * v_theta

    def error(v_implicit):
        if not adaptive_weight:
            return ((v_implicit - v_target) ** 2).mean(dim=dims)
        x0_error = sigma * (v_target - v_implicit)
        weight = x0_error.detach().double().abs().mean(dim=dims, keepdim=True).clamp(min=1e-5).float()
        return (x0_error**2 / weight).mean(dim=dims)

    positive, negative = error(v_pos), error(v_neg)
    loss = (adv_clip_max * (r * positive + (1 - r) * negative) / beta).mean()
    with torch.no_grad():
        diagnostics = {"nft_positive_loss": positive.mean(), "nft_negative_loss": negative.mean(),
                       "nft_old_deviation": ((v_theta - v_old) ** 2).mean()}
    return loss, diagnostics
