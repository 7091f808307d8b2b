"""The Flow-GRPO SDE step as a Gaussian policy: exact log-probs, recomputation, the ODE limit."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddpo.flow import sde_step_with_logprob
from tests.float_error import EPS, gaussian_log_prob_error

SHIFTS = [1.0, 3.0]  # diffusers' default, SD3's


def _scheduler(shift=3.0, num_steps=10):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler


STEP_ROUNDINGS = 16  # float32 roundings on any path from (x_t, v) to mu or the step's std


def _gaussian_reference(scheduler, v, step_index, x_t, noise_level):
    """The SDE step's Gaussian from dx = [v + a_t^2/(2t)(x + (1-t)v)]dt + a_t dw in float64, written
    out independently: (mean, std, how far float32 may be from them: mean_error per element and
    std_error relative). No factor cancels here: every rounding is within eps of its terms."""
    sigmas = scheduler.sigmas.double()
    t, t_next = sigmas[step_index], sigmas[step_index + 1]
    dt = t_next - t
    one_minus_t = 1 - (sigmas[1] if t == 1 else t)
    a_t = noise_level * math.sqrt(t / one_minus_t)
    x, v = x_t.double(), v.double()
    drift = v + a_t**2 / (2 * t) * (x + (1 - t) * v)
    mean = x + drift * dt
    terms = x.abs() + (v.abs() + a_t**2 / (2 * t) * (x.abs() + (1 - t) * v.abs())) * abs(dt)
    return mean, torch.tensor(a_t * math.sqrt(-dt)), STEP_ROUNDINGS * EPS * terms, STEP_ROUNDINGS * EPS


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("step_index", [0, 5, 9])
@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 16, 8)], ids=["sd3", "flux_packed"])
def test_log_prob_matches_independent_gaussian_density(shift, step_index, shape):
    scheduler = _scheduler(shift)
    t = float(scheduler.timesteps[step_index])
    g = torch.Generator().manual_seed(step_index)
    x_t, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    x_next, log_prob, ours_mean, ours_std = sde_step_with_logprob(scheduler, v, t, x_t, noise_level=0.7, generator=g)
    assert log_prob.shape == (shape[0],) and log_prob.dtype == torch.float32
    _, log_prob_sum, _, _ = sde_step_with_logprob(scheduler, v, t, x_t, noise_level=0.7, prev_sample=x_next,
                                                  log_prob_reduction="sum")
    mean, std, mean_error, std_error = _gaussian_reference(scheduler, v, step_index, x_t, noise_level=0.7)
    assert ((ours_mean.double() - mean).abs() <= mean_error).all()
    assert ((ours_std.double() - std).abs() <= std_error * std).all()
    density = torch.distributions.Normal(mean, std).log_prob(x_next.double())
    dims = tuple(range(1, len(shape)))
    for reduction, ours, exact in (("mean", log_prob, density.mean(dim=dims)),
                                   ("sum", log_prob_sum, density.sum(dim=dims))):
        # float32's bound from mu's and the std's errors, the density's roundings, and the reduction
        bound = gaussian_log_prob_error(x_next.double(), mean, std, mean_error, std_error, reduction)
        assert ((ours.double() - exact).abs() <= bound).all(), (reduction, ours, exact, bound)


def test_scoring_a_given_sample_gives_its_sampling_log_prob():
    scheduler = _scheduler()
    g = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = scheduler.timesteps[2].repeat(2)
    x_next, log_prob, mean, std = sde_step_with_logprob(scheduler, v, t, x_t, generator=g)
    _, rescored, mean2, std2 = sde_step_with_logprob(scheduler, v, t, x_t, prev_sample=x_next)
    # the same float32 operations on the same inputs: bit-equal
    torch.testing.assert_close(rescored, log_prob, rtol=0, atol=0)
    torch.testing.assert_close((mean2, std2), (mean, std), rtol=0, atol=0)
    # a sample far from the mean is less likely
    _, shifted, _, _ = sde_step_with_logprob(scheduler, v, t, x_t, prev_sample=x_next + 1.0)
    assert torch.all(shifted < log_prob)


def _toy_velocity(x, t):
    """A stand-in for the transformer: a fixed function of (x_t, t), per sample."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1))) / 1000
    return 0.8 * x.float() - 0.3 * t + 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stored_and_recomputed_log_probs_agree(dtype):
    """Sample a whole trajectory, store it in the sample dtype, then rescore every step at once
    (all steps of all samples in one batch, per-sample timesteps): |ratio - 1| < 1e-4."""
    scheduler = _scheduler()
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    latents = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    all_latents, all_log_probs = [latents], []
    for t in scheduler.timesteps:
        latents, log_prob, _, _ = sde_step_with_logprob(scheduler, _toy_velocity(latents, t), t, latents,
                                                        generator=generators)
        assert latents.dtype == dtype
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    stored = torch.stack(all_log_probs, dim=1)  # [B, T]
    traj = torch.stack(all_latents, dim=1)  # [B, T+1, ...]
    assert torch.isfinite(stored).all()

    steps = len(scheduler.timesteps)
    x_t, x_next = traj[:, :-1].flatten(0, 1), traj[:, 1:].flatten(0, 1)
    timesteps = scheduler.timesteps.repeat(3)
    _, recomputed, _, _ = sde_step_with_logprob(scheduler, _toy_velocity(x_t, timesteps), timesteps, x_t,
                                                prev_sample=x_next)
    ratio = torch.exp(recomputed.reshape(3, steps) - stored)
    # the design's contract, under the paper's clip range 1e-4 (here the two evaluations differ only
    # in the order the mean over 80 elements may sum in)
    assert (ratio - 1).abs().max() < 1e-4, f"ratio {ratio}"


@pytest.mark.parametrize("shift", SHIFTS)
def test_vanishing_noise_gives_the_schedulers_euler_step(shift):
    scheduler = _scheduler(shift)
    g = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        scheduler._step_index = None  # step() finds the index of t again
        euler = scheduler.step(v, t, x_t).prev_sample
        x_next, _, mean, std = sde_step_with_logprob(scheduler, v, t, x_t, noise_level=1e-6, generator=g)
        # both are x + v dt in float32 (the SDE's extra drift, a^2 ~ 1e-12, is below a rounding): a few
        # roundings of the terms apart
        rounding = 4 * EPS * (x_t.abs() + (v * (scheduler.sigmas[i + 1] - scheduler.sigmas[i])).abs())
        assert ((mean - euler).abs() <= rounding).all()
        assert float(std.max()) < 2e-6  # 1e-6 sqrt(t |dt| / (1 - t)), at most 1.07e-6 on these schedules
        # and the sample within 6 std of the mean (a normal goes further with probability 2e-9)
        assert ((x_next - euler).abs() <= rounding + 6 * std + EPS * x_next.abs()).all()


@pytest.mark.parametrize("shift", SHIFTS)
def test_per_sample_timesteps_match_scalar_steps(shift):
    scheduler = _scheduler(shift)
    g = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = scheduler.timesteps[[0, 4, 9]]
    batched = sde_step_with_logprob(scheduler, v, t, x_t, generator=[torch.Generator().manual_seed(i)
                                                                      for i in range(3)])
    assert batched[3].shape == (3, 1, 1, 1)
    for i in range(3):
        single = sde_step_with_logprob(scheduler, v[i:i + 1], float(t[i]), x_t[i:i + 1],
                                       generator=torch.Generator().manual_seed(i))
        prev_sample, log_prob, mean, std = (b[i:i + 1] for b in batched)
        # elementwise, every element is rounded the same whatever the batch: bit-equal
        torch.testing.assert_close((prev_sample, mean, std), (single[0], single[2], single[3]), rtol=0, atol=0)
        # the log-prob's mean over n elements may sum in another order: each within n eps of its terms
        terms = ((prev_sample - mean) / std) ** 2 / 2 + std.log().abs() + math.log(math.sqrt(2 * math.pi))
        assert abs(float(log_prob - single[1])) <= 2 * terms.numel() * EPS * float(terms.mean())


@pytest.mark.parametrize("step_index", [0, 9])
def test_samples_have_the_step_mean_and_std(step_index):
    scheduler = _scheduler(3.0)
    g = torch.Generator().manual_seed(step_index)
    x_t, v = torch.randn(2, 1024, 4, generator=g), torch.randn(2, 1024, 4, generator=g)
    t = scheduler.timesteps[step_index]
    x_next, _, mean, std = sde_step_with_logprob(scheduler, v, t, x_t, noise_level=0.7, generator=g)
    sigma, sigma_next = float(scheduler.sigmas[step_index]), float(scheduler.sigmas[step_index + 1])
    one_minus = 1 - (float(scheduler.sigmas[1]) if sigma == 1 else sigma)
    expected_std = 0.7 * math.sqrt(sigma / one_minus) * math.sqrt(sigma - sigma_next)
    assert std.shape == (2, 1, 1)
    assert abs(float(std[0]) - expected_std) <= STEP_ROUNDINGS * EPS * expected_std  # float32's roundings of it
    z = (x_next - mean) / std  # 4096 standard normals per sample
    assert z.mean(dim=(1, 2)).abs().max() < 0.06  # ~4 standard errors, 1/sqrt(4096) each
    assert (z.std(dim=(1, 2)) - 1).abs().max() < 0.05  # ~4.5 standard errors, 1/sqrt(2 * 4096) each


def _one_line_error(call):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_errors_are_one_line_value_errors():
    x, v = torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    fresh = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert "set_timesteps" in _one_line_error(lambda: sde_step_with_logprob(fresh, v, 1000.0, x))
    scheduler = _scheduler()
    assert "500" in _one_line_error(lambda: sde_step_with_logprob(scheduler, v, 500.0, x))
    t = scheduler.timesteps[[0, 1]].clone()
    t[1] += 0.5
    assert "not on the scheduler's schedule" in _one_line_error(lambda: sde_step_with_logprob(scheduler, v, t, x))
    for bad in (0.0, -0.1):
        assert "noise_level" in _one_line_error(
            lambda: sde_step_with_logprob(scheduler, v, scheduler.timesteps[0], x, noise_level=bad))
    assert "log_prob_reduction" in _one_line_error(
        lambda: sde_step_with_logprob(scheduler, v, scheduler.timesteps[0], x, log_prob_reduction="max"))
    assert "one per sample" in _one_line_error(
        lambda: sde_step_with_logprob(scheduler, v, scheduler.timesteps[:3], x))
