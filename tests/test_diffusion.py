"""The DDIM step as a Gaussian policy: exact log-probs, recomputation, reproducible sampling."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ddpo.config import SampleConfig
from ddpo.diffusion import ddim_step_with_logprob, sample_trajectories, step_log_prob
from ddpo.families import family_of
from ddpo.pipeline import build_tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return family_of(build_tiny_pipeline(seed=0))


def _scheduler(num_steps=10):
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _gaussian_reference(scheduler, eps, t, x_t, x_prev, eta):
    """log N(x_prev; mu, sigma^2) from the DDIM formulas, written out independently."""
    a = scheduler.alphas_cumprod
    t_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = a[t].double()
    a_prev = a[t_prev].double() if t_prev >= 0 else torch.tensor(float(scheduler.final_alpha_cumprod)).double()
    x0 = (x_t.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    sigma = eta * (((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)).sqrt()
    mu = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps.double()
    return torch.distributions.Normal(mu, sigma).log_prob(x_prev.double())


@pytest.mark.parametrize("step_index", [0, 5, 9])
def test_log_prob_matches_independent_gaussian_density(step_index):
    scheduler = _scheduler()
    t = int(scheduler.timesteps[step_index])
    g = torch.Generator().manual_seed(step_index)
    x_t, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    x_prev, log_prob, *_ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=1.0, generator=g)
    reference = _gaussian_reference(scheduler, eps, t, x_t, x_prev, eta=1.0)
    torch.testing.assert_close(log_prob.double(), reference.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)

    _, log_prob_sum, *_ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=1.0, prev_sample=x_prev,
                                             log_prob_reduction="sum")
    torch.testing.assert_close(log_prob_sum.double(), reference.sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-3)


def test_scoring_a_given_sample_gives_its_sampling_log_prob():
    scheduler = _scheduler()
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([int(scheduler.timesteps[2])] * 2)
    x_prev, log_prob, *_ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=0.7, generator=g)
    _, rescored, *_ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=0.7, prev_sample=x_prev)
    torch.testing.assert_close(rescored, log_prob)
    # a sample far from the mean is less likely
    _, shifted, *_ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=0.7, prev_sample=x_prev + 1.0)
    assert torch.all(shifted < log_prob)


def test_stored_and_recomputed_log_probs_agree(pipe):
    """|ratio - 1| < 1e-4 in float32 for every step of every sample, with guidance."""
    prompts, seeds = ["a cat", "a dog", "a bird"], [1, 2, 3]
    sample = SampleConfig(num_steps=6, guidance_scale=5.0, eta=1.0, height=32, width=32)
    traj = sample_trajectories(pipe, prompts, seeds, sample)
    assert traj.latents.shape == (3, 7, 4, 16, 16)
    assert traj.log_probs.shape == (3, 6) and traj.timesteps.shape == (3, 6)
    assert traj.images.shape == (3, 32, 32, 3) and traj.images.dtype == np.uint8
    cond, negative = pipe.encode(prompts, with_negative=True)
    with torch.no_grad():
        for j in range(6):
            log_prob = step_log_prob(pipe, traj.latents[:, j], traj.latents[:, j + 1],
                                     traj.timesteps[:, j], cond, negative, sample).log_prob
            ratio = torch.exp(log_prob - traj.log_probs[:, j])
            assert (ratio - 1).abs().max() < 1e-4, f"step {j}: ratio {ratio}"


def test_sampling_is_seeded_and_independent_of_batch_composition(pipe):
    sample = SampleConfig(num_steps=3, guidance_scale=3.0, eta=1.0, height=32, width=32)
    a = sample_trajectories(pipe, ["a cat", "a dog"], [7, 8], sample)
    b = sample_trajectories(pipe, ["a cat", "a dog"], [7, 8], sample)
    c = sample_trajectories(pipe, ["a dog"], [8], sample)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    np.testing.assert_array_equal(a.images, b.images)
    torch.testing.assert_close(a.latents[1:], c.latents, rtol=1e-5, atol=1e-5)
    d = sample_trajectories(pipe, ["a cat", "a dog"], [9, 8], sample)
    assert not torch.allclose(a.latents[0], d.latents[0])


def test_eta_scales_the_step_noise():
    scheduler = _scheduler()
    t = int(scheduler.timesteps[3])
    x_t = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.zeros_like(x_t)
    mean, _, *_ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=1e-6, generator=torch.Generator().manual_seed(1))
    x_prev, _, *_ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=1.0, generator=torch.Generator().manual_seed(1))
    a = scheduler.alphas_cumprod
    t_prev = t - 1000 // 10
    sigma = math.sqrt((1 - a[t_prev]) / (1 - a[t]) * (1 - a[t] / a[t_prev]))
    assert abs(float((x_prev - mean).std()) - sigma) < 0.05 * sigma
