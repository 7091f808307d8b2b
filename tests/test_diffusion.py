"""The DDIM step as a Gaussian policy: exact log-probs, recomputation, reproducible sampling."""

import math
from typing import NamedTuple

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ddpo.config import DDIMConfig, SampleConfig
from ddpo.ddim import ddim_step_with_logprob
from ddpo.rollout import sample_trajectories, step_log_prob
from ddpo.families import family_of
from ddpo.pipeline import build_tiny_pipeline
from tests.float_error import EPS, gaussian_log_prob_error


@pytest.fixture(scope="module")
def pipe():
    return family_of(build_tiny_pipeline(seed=0))


PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
STEP_ROUNDINGS = 16  # float32 roundings on any path from (x_t, output) to mu: (12)'s x_0, (16)'s sigma, mu


def _scheduler(num_steps=10, **config):
    """DDIM as Stable Diffusion configures it; `config` overrides (SD 2.x: prediction_type)."""
    scheduler = DDIMScheduler(**{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                 "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, **config})
    scheduler.set_timesteps(num_steps)
    return scheduler


class ReferenceStep(NamedTuple):
    x0: torch.Tensor  # predicted x_0, before any clipping
    mean: torch.Tensor
    std: torch.Tensor
    mean_error: torch.Tensor  # how far a float32 mean may be from `mean`, per element
    std_error: torch.Tensor  # ... and a float32 std from `std`, relative


def _reference_step(scheduler, model_output, timesteps, x_t, eta):
    """The DDIM step's Gaussian in float64 from the definitions, written out independently of
    ddpo/ddim.py and diffusers, and the error a float32 evaluation of it may have."""
    c = scheduler.config
    view = (-1,) + (1,) * (x_t.ndim - 1)
    t = torch.as_tensor(timesteps).expand(len(x_t))
    t_prev = t - c.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.double()
    a_t = alphas[t].reshape(view)
    a_prev = torch.where(t_prev >= 0, alphas[t_prev.clamp(min=0)], float(scheduler.final_alpha_cumprod)).reshape(view)
    # x_t = p x_0 + q eps (the forward process) and the model's output o = r x_0 + s eps (eps: (0, 1);
    # v = sqrt(a_t) eps - sqrt(1 - a_t) x_0; x_0: (1, 0)): solve the pair for (x_0, eps), by Cramer's rule
    x, o = x_t.double(), model_output.double()
    p, q = a_t.sqrt(), (1 - a_t).sqrt()
    r, s = {"epsilon": (0, 1), "v_prediction": (-q, p), "sample": (1, 0)}[c.prediction_type]
    det = p * s - q * r
    x0, eps = (s * x - q * o) / det, (p * o - r * x) / det
    x0_size, eps_size = (abs(s) * x.abs() + q * o.abs()) / det.abs(), (p * o.abs() + abs(r) * x.abs()) / det.abs()
    x0_used = x0.clamp(-c.clip_sample_range, c.clip_sample_range) if c.clip_sample else x0
    # sigma_t, formula (16), and mu, formula (12)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    direction = (1 - a_prev - std**2).sqrt()
    mean = a_prev.sqrt() * x0_used + direction * eps
    # float32: 1 - a_t/a_{t-1} cancels (kappa = (a_t/a_{t-1}) / (1 - a_t/a_{t-1}) times the ratio's
    # rounding), and so does 1 - a_{t-1} - sigma^2; every other rounding is within eps of its terms
    kappa = (a_t / a_prev) / (1 - a_t / a_prev)
    std_error = EPS * (STEP_ROUNDINGS + kappa)
    direction_error = EPS * (STEP_ROUNDINGS + ((1 - a_prev) + std**2 * (STEP_ROUNDINGS + kappa)) / direction**2)
    mean_error = (EPS * STEP_ROUNDINGS * a_prev.sqrt() * x0_size
                  + (EPS * STEP_ROUNDINGS + direction_error) * direction * eps_size)
    return ReferenceStep(x0, mean, std, mean_error, std_error)


def _inputs(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 8, 8, generator=g), g


@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_step_mean_is_diffusers_ddim_step(prediction_type, clip_sample):
    """mu is what diffusers' DDIMScheduler.step returns with zero variance noise, for each
    prediction type, with and without clip_sample, at the first, a middle and the last step,
    one timestep per sample."""
    scheduler = _scheduler(prediction_type=prediction_type, clip_sample=clip_sample, clip_sample_range=1.5)
    t = scheduler.timesteps[[0, 5, 9]]
    x_t, output, g = _inputs(3, 0)
    step = ddim_step_with_logprob(scheduler, output, t, x_t, eta=1.0, generator=g)
    theirs = torch.cat([scheduler.step(output[i:i + 1], int(t[i]), x_t[i:i + 1], eta=1.0,
                                       variance_noise=torch.zeros_like(x_t[i:i + 1])).prev_sample for i in range(3)])
    reference = _reference_step(scheduler, output, t, x_t, eta=1.0)
    if clip_sample:  # the clip is at work in every sample
        assert (reference.x0.abs() > 1.5).flatten(1).any(dim=1).all()
    # two float32 evaluations of mu, each within mean_error of it
    assert ((step.mean.double() - theirs.double()).abs() <= 2 * reference.mean_error).all()


@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_log_prob_matches_independent_gaussian_density(prediction_type, clip_sample):
    scheduler = _scheduler(prediction_type=prediction_type, clip_sample=clip_sample, clip_sample_range=1.5)
    t = scheduler.timesteps[[0, 5, 9]]
    x_t, output, g = _inputs(3, 1)
    x_prev, log_prob, mean, std = ddim_step_with_logprob(scheduler, output, t, x_t, eta=1.0, generator=g)
    _, log_prob_sum, *_ = ddim_step_with_logprob(scheduler, output, t, x_t, eta=1.0, prev_sample=x_prev,
                                                 log_prob_reduction="sum")
    ref = _reference_step(scheduler, output, t, x_t, eta=1.0)
    assert ((std.double() - ref.std).abs() <= ref.std_error * ref.std).all()  # std_error is relative
    assert ((mean.double() - ref.mean).abs() <= ref.mean_error).all()
    density = torch.distributions.Normal(ref.mean, ref.std).log_prob(x_prev.double())
    for reduction, ours, exact in (("mean", log_prob, density.mean(dim=(1, 2, 3))),
                                   ("sum", log_prob_sum, density.sum(dim=(1, 2, 3)))):
        # float32's bound from mu's and sigma's errors, the density's roundings, and the reduction
        bound = gaussian_log_prob_error(x_prev.double(), ref.mean, ref.std, ref.mean_error, ref.std_error, reduction)
        assert ((ours.double() - exact).abs() <= bound).all(), (reduction, ours, exact, bound)


def test_unsupported_scheduler_settings_are_refused_in_one_line():
    x = torch.zeros(1, 4, 2, 2)
    for setting, name in (({"thresholding": True}, "thresholding"), ({"prediction_type": "flow"}, "prediction_type"),
                          ({"set_alpha_to_one": True}, "set_alpha_to_one")):
        scheduler = _scheduler(**setting)
        with pytest.raises(ValueError, match=name) as info:
            ddim_step_with_logprob(scheduler, x, scheduler.timesteps[0], x)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_the_denoising_target_is_what_the_unet_predicts(pipe, prediction_type, monkeypatch):
    """RWR regresses the UNet on x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps against eps, v or x_0."""
    monkeypatch.setattr(pipe.pipe, "scheduler", _scheduler(prediction_type=prediction_type))
    x0, noise, _ = _inputs(2, 2)
    t = torch.tensor([901, 1])
    noisy, target = pipe.noised(x0, noise, t)
    a = pipe.scheduler.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    root_a, root_b = a.sqrt(), (1 - a).sqrt()
    target_coefficients = {"epsilon": (0, 1), "v_prediction": (-root_b, root_a), "sample": (1, 0)}[prediction_type]
    for ours, (c0, c1) in ((noisy, (root_a, root_b)), (target, target_coefficients)):
        exact = c0 * x0.double() + c1 * noise.double()  # c0 x_0 + c1 eps
        # two products and a sum of float32 terms (and their coefficients' square roots)
        assert ((ours.double() - exact).abs() <= 4 * EPS * (abs(c0) * x0.abs() + abs(c1) * noise.abs())).all()


def test_scoring_a_given_sample_gives_its_sampling_log_prob():
    scheduler = _scheduler()
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([int(scheduler.timesteps[2])] * 2)
    x_prev, log_prob, *_ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=0.7, generator=g)
    _, rescored, *_ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=0.7, prev_sample=x_prev)
    torch.testing.assert_close(rescored, log_prob, rtol=0, atol=0)  # the same float32 operations: bit-equal
    # a sample far from the mean is less likely
    _, shifted, *_ = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=0.7, prev_sample=x_prev + 1.0)
    assert torch.all(shifted < log_prob)


def test_stored_and_recomputed_log_probs_agree(pipe):
    """|ratio - 1| < 1e-4 in float32 for every step of every sample, with guidance."""
    prompts, seeds = ["a cat", "a dog", "a bird"], [1, 2, 3]
    sample = SampleConfig(num_steps=6, guidance_scale=5.0, height=32, width=32, ddim=DDIMConfig(eta=1.0))
    traj = sample_trajectories(pipe, prompts, seeds, sample)
    assert traj.latents.shape == (3, 7, 4, 16, 16)
    assert traj.log_probs.shape == (3, 6) and traj.timesteps.shape == (3, 6)
    assert traj.media.images.shape == (3, 32, 32, 3) and traj.media.images.dtype == np.uint8
    cond, negative = pipe.encode(prompts, with_negative=True)
    with torch.no_grad():
        for j in range(6):
            log_prob = step_log_prob(pipe, traj.latents[:, j], traj.latents[:, j + 1],
                                     traj.timesteps[:, j], cond, negative, sample).log_prob
            ratio = torch.exp(log_prob - traj.log_probs[:, j])
            # the design's contract: recompute noise under the paper's clip range 1e-4
            assert (ratio - 1).abs().max() < 1e-4, f"step {j}: ratio {ratio}"


def test_sampling_is_seeded_and_independent_of_batch_composition(pipe):
    sample = SampleConfig(num_steps=3, guidance_scale=3.0, height=32, width=32, ddim=DDIMConfig(eta=1.0))
    a = sample_trajectories(pipe, ["a cat", "a dog"], [7, 8], sample)
    b = sample_trajectories(pipe, ["a cat", "a dog"], [7, 8], sample)
    c = sample_trajectories(pipe, ["a dog"], [8], sample)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    np.testing.assert_array_equal(a.media.images, b.media.images)
    # another batch size may take other float32 kernels in the UNet: per step, its output moves by
    # up to K eps of the latents' size, K = 3072 its longest sum (GroupNorm over 12 channels x 16 x 16)
    tolerance = 3 * 3072 * EPS * float(a.latents.abs().max())
    torch.testing.assert_close(a.latents[1:], c.latents, rtol=0, atol=tolerance)
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
    # the std of 16384 normals: 0.05 is 9 standard errors (1/sqrt(2 * 16384) = 0.0055 each)
    assert abs(float((x_prev - mean).std()) - sigma) < 0.05 * sigma
