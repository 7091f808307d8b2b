"""The Flow-GRPO SDE step as a Gaussian policy: exact log-probs, recomputation, the ODE limit."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddpo.flow import ode_step, sde_step_with_logprob
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


# -- the ODE step outside an SDE window, and coefficients-preserving sampling (CPS) ---------------

def _dynamic_scheduler(num_steps=10):
    """FLUX's schedule: the shift from the image size (mu), as ddpo/families/sd3.py sets it."""
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    scheduler.set_timesteps(num_steps, mu=0.8)
    return scheduler


SCHEDULERS = {"shift1": lambda: _scheduler(1.0), "shift3": lambda: _scheduler(3.0), "dynamic": _dynamic_scheduler}


@pytest.mark.parametrize("make_scheduler", SCHEDULERS.values(), ids=SCHEDULERS.keys())
def test_ode_step_is_the_schedulers_euler_step(make_scheduler):
    """Each step index, one timestep for the batch and then one per sample: the same float32
    operations as FlowMatchEulerDiscreteScheduler.step (x + (sigma' - sigma) v): bit-equal."""
    scheduler = make_scheduler()
    g = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    steps = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        reference = make_scheduler()  # a fresh scheduler: step() finds the index of t itself
        expected = reference.step(v, t, x_t).prev_sample
        torch.testing.assert_close(ode_step(scheduler, v, t, x_t), expected, rtol=0, atol=0)
    indices = [0, steps // 2, steps - 1]
    ours = ode_step(scheduler, v, scheduler.timesteps[indices], x_t)
    for row, i in enumerate(indices):
        expected = make_scheduler().step(v[row:row + 1], scheduler.timesteps[i], x_t[row:row + 1]).prev_sample
        torch.testing.assert_close(ours[row:row + 1], expected, rtol=0, atol=0)


def test_ode_step_in_bfloat16_upcasts_where_diffusers_multiplies_in_bfloat16():
    """In bfloat16 diffusers forms dt * v in the model's dtype (a 0-d float32 times a bfloat16
    tensor stays bfloat16) while ode_step takes it in float32: the two differ by at most that
    product's bfloat16 rounding plus each result's own (and float32's, far smaller)."""
    scheduler = _scheduler(3.0)
    g = torch.Generator().manual_seed(1)
    x_t, v = torch.randn(2, 4, 8, 8, generator=g).bfloat16(), torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    eps_bf16 = torch.finfo(torch.bfloat16).eps
    for i, t in enumerate(scheduler.timesteps):
        ours = ode_step(scheduler, v, t, x_t)
        theirs = _scheduler(3.0).step(v, t, x_t).prev_sample
        assert ours.dtype == theirs.dtype == torch.bfloat16
        dt = float(scheduler.sigmas[i + 1]) - float(scheduler.sigmas[i])
        exact = x_t.double() + dt * v.double()
        step = (dt * v.double()).abs()
        bound = eps_bf16 * (exact.abs() + step) + 4 * EPS * (x_t.double().abs() + step)
        assert ((ours.double() - theirs.double()).abs() <= bound).all()


def _cps_reference(scheduler, v, step_index, x_t, noise_level):
    """CPS's Gaussian in float64, from Wang & Yu 2025 Eq. 8 written out independently:
    x_0 = x - t v, eps = x + (1 - t) v, s = t' sin(a pi / 2), mu = (1 - t') x_0 + sqrt(t'^2 - s^2) eps;
    and how far float32 may be from them (mean_error per element, std_error relative).
    t'^2 - s^2 cancels: its float32 error is a few roundings of t'^2 + s^2, relative to t'^2 - s^2."""
    sigmas = scheduler.sigmas.double()
    t, t_next = float(sigmas[step_index]), float(sigmas[step_index + 1])
    s = t_next * math.sin(noise_level * math.pi / 2)
    noise_coef = math.sqrt(t_next**2 - s**2)
    x, v = x_t.double(), v.double()
    x0, eps = x - t * v, x + (1 - t) * v
    mean = (1 - t_next) * x0 + noise_coef * eps
    coef_error = 4 * EPS * (t_next**2 + s**2) / (t_next**2 - s**2) + 2 * EPS  # relative, of sqrt(t'^2 - s^2)
    terms = (1 - t_next) * (x.abs() + t * v.abs()) + noise_coef * (x.abs() + (1 - t) * v.abs())
    mean_error = STEP_ROUNDINGS * EPS * terms + coef_error * noise_coef * eps.abs()
    return mean, torch.tensor(s, dtype=torch.float64), mean_error, STEP_ROUNDINGS * EPS


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("step_index", [0, 4, 8])  # 9 (t' = 0) is refused
@pytest.mark.parametrize("noise_level", [0.3, 0.7])
def test_cps_log_prob_matches_independent_gaussian_density(shift, step_index, noise_level):
    scheduler = _scheduler(shift)
    t = float(scheduler.timesteps[step_index])
    g = torch.Generator().manual_seed(step_index)
    x_t, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    x_next, log_prob, ours_mean, ours_std = sde_step_with_logprob(scheduler, v, t, x_t, noise_level=noise_level,
                                                                  generator=g, sde_type="cps")
    _, log_prob_sum, _, _ = sde_step_with_logprob(scheduler, v, t, x_t, noise_level=noise_level, prev_sample=x_next,
                                                  log_prob_reduction="sum", sde_type="cps")
    mean, std, mean_error, std_error = _cps_reference(scheduler, v, step_index, x_t, noise_level)
    assert ((ours_mean.double() - mean).abs() <= mean_error).all()
    assert ((ours_std.double() - std).abs() <= std_error * std).all()
    density = torch.distributions.Normal(mean, std).log_prob(x_next.double())
    for reduction, ours, exact in (("mean", log_prob, density.mean(dim=(1, 2, 3))),
                                   ("sum", log_prob_sum, density.sum(dim=(1, 2, 3)))):
        bound = gaussian_log_prob_error(x_next.double(), mean, std.expand(3, 1, 1, 1), mean_error, std_error,
                                        reduction)
        assert ((ours.double() - exact).abs() <= bound).all(), (reduction, ours, exact, bound)


@pytest.mark.parametrize("step_index", [0, 3, 8])
def test_cps_keeps_the_marginals_coefficients(step_index):
    """With the true velocity v = eps - x_0 at x_t = (1 - t) x_0 + t eps, CPS's mean is
    (1 - t') x_0 + sqrt(t'^2 - s^2) eps, and its sample (1 - t') x_0 + [sqrt(t'^2 - s^2) eps + s z]:
    the marginal's coefficient of x_0 and a total noise of variance exactly t'^2 (no excess noise)."""
    scheduler = _scheduler(3.0)
    g = torch.Generator().manual_seed(step_index)
    x0, eps = torch.randn(2, 1024, 4, generator=g, dtype=torch.float64), torch.randn(2, 1024, 4, generator=g,
                                                                                        dtype=torch.float64)
    t, t_next = float(scheduler.sigmas[step_index]), float(scheduler.sigmas[step_index + 1])
    x_t, v = ((1 - t) * x0 + t * eps).float(), (eps - x0).float()
    noise_level = 0.7
    x_next, _, mean, std = sde_step_with_logprob(scheduler, v, scheduler.timesteps[step_index], x_t,
                                                 noise_level=noise_level, generator=g, sde_type="cps")
    s = t_next * math.sin(noise_level * math.pi / 2)
    noise_coef = math.sqrt(t_next**2 - s**2)
    assert noise_coef**2 + s**2 == pytest.approx(t_next**2, rel=4 * torch.finfo(torch.float64).eps)
    # the mean, from x_t and v rounded to float32: the float32 roundings of the terms (x_0 - t v's
    # cancellation leaves errors of the size of x_t and v, not of x_0)
    expected = (1 - t_next) * x0 + noise_coef * eps
    terms = (1 - t_next) * (x_t.double().abs() + t * v.double().abs()) + noise_coef * (
        x_t.double().abs() + (1 - t) * v.double().abs())
    assert ((mean.double() - expected).abs() <= STEP_ROUNDINGS * EPS * terms).all()
    # the sample's noise part n = x' - (1 - t') x_0 on 4096 elements per sample: variance t'^2 and
    # regression coefficient on eps sqrt(t'^2 - s^2) (z is independent of eps)
    noise = x_next.double() - (1 - t_next) * x0
    n = noise[0].numel()
    variance = noise.pow(2).mean(dim=(1, 2))
    assert ((variance / t_next**2 - 1).abs() < 5 * math.sqrt(2 / n)).all()  # 5 standard errors
    coef = (noise * eps).sum(dim=(1, 2)) / eps.pow(2).sum(dim=(1, 2))
    assert ((coef - noise_coef).abs() < 5 * s / math.sqrt(n)).all()  # 5 standard errors of s z's part
    assert std.shape == (2, 1, 1) and float(std[0]) == pytest.approx(s, rel=STEP_ROUNDINGS * EPS)


def test_cps_refuses_the_step_to_t_zero():
    scheduler = _scheduler()
    x, v = torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    last = scheduler.timesteps[-1]
    assert "t' = 0" in _one_line_error(lambda: sde_step_with_logprob(scheduler, v, last, x, sde_type="cps"))
    mixed = scheduler.timesteps[[0, -1]]  # one sample's step is the last
    assert "t' = 0" in _one_line_error(lambda: sde_step_with_logprob(scheduler, v, mixed, x, sde_type="cps"))
    sde_step_with_logprob(scheduler, v, last, x)  # Flow-GRPO's last step has noise: allowed
    assert "sde_type" in _one_line_error(lambda: sde_step_with_logprob(scheduler, v, last, x, sde_type="ode"))
