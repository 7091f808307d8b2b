"""Each loss on a small hand-worked case, with clipping active and inactive."""

import math

import pytest
import torch

from ddpo.losses import (
    ddpo_is_loss, ddpo_sf_loss, diffusion_nft_loss, importance_weight, kl_to_reference, nft_optimality, rwr_loss,
    rwr_weights,
)
from tests.float_error import U32, U64


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_ddpo_is_inside_the_clip_is_minus_advantage_times_ratio():
    # ratios e^0.01 ~ 1.01005 and e^-0.01 ~ 0.99005, both within 1 +- 0.05
    log_prob, log_prob_old = t(0.01, -0.01), t(0.0, 0.0)
    advantages = t(2.0, -1.0)
    loss, diag = ddpo_is_loss(log_prob, log_prob_old, advantages, t(1.0, 1.0), clip_range=0.05)
    expected = (-2.0 * math.exp(0.01) + 1.0 * math.exp(-0.01)) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    assert float(diag["clipfrac"]) == 0.0
    assert float(diag["approx_kl"]) == pytest.approx(0.5 * 0.01**2, abs=1e-12)


def test_ddpo_is_clips_the_ratio_where_it_would_gain_beyond_the_trust_region():
    # sample 0: A > 0, ratio e^0.5 ~ 1.65 > 1.1 -> clipped term -A * 1.1 is larger (pessimistic)
    # sample 1: A < 0, ratio e^0.5 -> unclipped term -A * 1.65 is larger: not clipped away
    log_prob, log_prob_old = t(0.5, 0.5), t(0.0, 0.0)
    advantages = t(1.0, -1.0)
    loss, diag = ddpo_is_loss(log_prob, log_prob_old, advantages, t(1.0, 1.0), clip_range=0.1)
    expected = (-1.0 * 1.1 + 1.0 * math.exp(0.5)) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    assert float(diag["clipfrac"]) == 1.0
    # the gradient flows only through the unclipped sample
    log_prob = log_prob.clone().requires_grad_(True)
    ddpo_is_loss(log_prob, log_prob_old, advantages, t(1.0, 1.0), clip_range=0.1)[0].backward()
    assert float(log_prob.grad[0]) == 0.0
    assert float(log_prob.grad[1]) == pytest.approx(math.exp(0.5) / 2, abs=1e-12)


def test_decoupled_loss_equals_the_papers_loss_at_lag_zero():
    """On-policy, p_prox = p_behaviour: w = 1 exactly and the loss is the paper's."""
    g = torch.Generator().manual_seed(0)
    log_prob_old = torch.randn(16, generator=g, dtype=torch.float64)
    log_prob = log_prob_old + 0.01 * torch.randn(16, generator=g, dtype=torch.float64)
    advantages = torch.randn(16, generator=g, dtype=torch.float64)
    weight = importance_weight(log_prob_old, log_prob_old, cap=1.0)
    assert torch.equal(weight, torch.ones(16, dtype=torch.float64))
    decoupled, _ = ddpo_is_loss(log_prob, log_prob_old, advantages, weight, clip_range=1e-4)
    ratio = torch.exp(log_prob - log_prob_old)
    paper = torch.mean(torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - 1e-4, 1 + 1e-4)))
    assert float(decoupled) == float(paper)


def test_importance_weight_is_truncated():
    w = importance_weight(t(0.0, 0.0), t(0.5, -0.5), cap=1.0)
    assert float(w[0]) == pytest.approx(math.exp(-0.5))
    assert float(w[1]) == 1.0  # e^0.5 truncated at c = 1
    assert float(importance_weight(t(0.0), t(-0.5), cap=2.0)[0]) == pytest.approx(math.exp(0.5))


def test_ddpo_sf_is_reinforce():
    log_prob = t(-1.0, -2.0).requires_grad_(True)
    loss, _ = ddpo_sf_loss(log_prob, t(1.0, -3.0), t(1.0, 0.5))
    assert loss.item() == pytest.approx((1.0 * -1.0 * -1.0 + 3.0 * 0.5 * -2.0) / 2)
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([-0.5, 0.75])


def test_rwr_exponential_weights():
    w = rwr_weights(t(0.0, math.log(3.0)), beta=1.0)
    # exp(r): 1 and 3, normalised to mean 1 -> 0.5 and 1.5
    assert w.tolist() == pytest.approx([0.5, 1.5])
    sharper = rwr_weights(t(0.0, math.log(3.0)), beta=0.5)
    assert sharper.tolist() == pytest.approx([0.2, 1.8])


def test_rwr_sparse_weights_keep_the_top_fraction():
    w = rwr_weights(t(0.1, 0.9, 0.5, 0.3), top_fraction=0.5)
    assert w.tolist() == pytest.approx([0.0, 2.0, 2.0, 0.0])


def test_rwr_loss_is_the_weighted_denoising_loss():
    noise = torch.zeros(2, 1, 2, 2)
    noise_pred = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    loss, _ = rwr_loss(noise_pred, noise, torch.tensor([0.5, 1.5]))
    assert float(loss) == pytest.approx((0.5 * 1.0 + 1.5 * 4.0) / 2)


def test_kl_to_the_reference_is_that_of_two_gaussians_with_one_std():
    """KL(N(mu, s^2) || N(mu_ref, s^2)) = (mu - mu_ref)^2 / (2 s^2) per element, checked against
    torch.distributions and reduced as the log-prob (mean or sum over the latent)."""
    g = torch.Generator().manual_seed(0)
    mean, mean_ref = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    std = torch.tensor([0.5, 2.0], dtype=torch.float64).view(2, 1, 1)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std.expand_as(mean)),
                                                  torch.distributions.Normal(mean_ref, std.expand_as(mean)))
    torch.testing.assert_close(kl_to_reference(mean, mean_ref, std), reference.mean(dim=(1, 2)))
    torch.testing.assert_close(kl_to_reference(mean, mean_ref, std, "sum"), reference.sum(dim=(1, 2)))
    assert kl_to_reference(mean, mean, std).abs().max() == 0


# -- DiffusionNFT ----------------------------------------------------------------------------------

def test_nft_optimality_maps_the_clipped_advantage_linearly_onto_0_1():
    advantages = t(-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0)
    assert nft_optimality(advantages, adv_clip_max=5.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def _nft_reference(v_theta, v_old, x0, eps, sigma, advantages, c, beta, adaptive_weight):
    """The published DiffusionNFT loss (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py), transcribed in
    float64 from the noised sample x_t = (1 - t) x_0 + t eps: (loss, mean positive loss, mean negative loss)."""
    v_theta, v_old, x0, eps = (a.double() for a in (v_theta, v_old, x0, eps))
    view = (-1,) + (1,) * (x0.ndim - 1)
    t_ = sigma.double().reshape(view)
    r = torch.clamp(advantages.double().clamp(-c, c) / c / 2 + 0.5, 0, 1)
    x_t = (1 - t_) * x0 + t_ * eps
    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta
    dims = tuple(range(1, x0.ndim))

    def per_sample(v_implicit):
        if not adaptive_weight:
            return ((v_implicit - (eps - x0)) ** 2).mean(dim=dims)
        x0_pred = x_t - t_ * v_implicit
        weight = (x0_pred - x0).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
        return ((x0_pred - x0) ** 2 / weight).mean(dim=dims)

    positive, negative = per_sample(v_pos), per_sample(v_neg)
    return (c * (r * positive + (1 - r) * negative) / beta).mean(), positive.mean(), negative.mean()


@pytest.mark.parametrize("adaptive_weight", [True, False])
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_diffusion_nft_loss_is_the_published_formula(adaptive_weight, beta):
    g = torch.Generator().manual_seed(0)
    shape = (4, 3, 4, 4)
    x0, eps, v_theta, v_old = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    sigma = t(0.95, 0.6, 0.3, 0.02)
    advantages = t(-7.0, -1.0, 0.5, 6.0)  # two beyond the clip c = 5
    c = 5.0
    loss, diag = diffusion_nft_loss(v_theta, v_old, eps - x0, sigma.view(-1, 1, 1, 1), nft_optimality(advantages, c),
                                    beta, c, adaptive_weight)
    expected, positive, negative = _nft_reference(v_theta, v_old, x0, eps, sigma, advantages, c, beta,
                                                  adaptive_weight)
    # float64 throughout but for the adaptive weight, which is rounded to float32 once (relative
    # U32 on each term); x_t - t v+- - x_0 and t (v - v+-) agree to float64's roundings of x_t's terms
    rel = (U32 if adaptive_weight else 0.0) + 64 * U64
    assert float(loss) == pytest.approx(float(expected), rel=rel, abs=0)
    assert float(diag["nft_positive_loss"]) == pytest.approx(float(positive), rel=rel, abs=0)
    assert float(diag["nft_negative_loss"]) == pytest.approx(float(negative), rel=rel, abs=0)
    assert float(diag["nft_old_deviation"]) == pytest.approx(float(((v_theta - v_old) ** 2).mean()), rel=16 * U64)


def test_diffusion_nft_with_beta_one_trains_v_theta_itself_on_rewarded_samples():
    """beta = 1: v+ = v_theta, so for r = 1 the loss is c times flow matching's ||v_theta - v||^2."""
    g = torch.Generator().manual_seed(1)
    v_theta, v_old, v = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    loss, diag = diffusion_nft_loss(v_theta, v_old, v, t(0.5, 0.5).view(-1, 1, 1), t(1.0, 1.0), 1.0, 5.0,
                                    adaptive_weight=False)
    assert float(loss) == pytest.approx(5.0 * float(((v_theta - v) ** 2).mean()), rel=16 * U64, abs=0)
    assert float(diag["nft_positive_loss"]) == pytest.approx(float(((v_theta - v) ** 2).mean()), rel=16 * U64, abs=0)


@pytest.mark.parametrize("adaptive_weight", [True, False])
def test_diffusion_nft_pulls_toward_the_target_when_rewarded_and_pushes_away_otherwise(adaptive_weight):
    """At v_theta = v_old, a gradient step moves v_theta toward the flow target v for r = 1 and
    away from it (along v_old - v) for r = 0; v_old gets no gradient."""
    g = torch.Generator().manual_seed(2)
    v_old, v = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g,
                                                                                      dtype=torch.float64)
    sigma, c, beta = t(0.7, 0.2).view(-1, 1, 1), 5.0, 0.5
    for r, sign in ((1.0, 1.0), (0.0, -1.0)):
        v_theta, old = v_old.clone().requires_grad_(True), v_old.clone().requires_grad_(True)
        loss, _ = diffusion_nft_loss(v_theta, old, v, sigma, t(r, r), beta, c, adaptive_weight)
        loss.backward()
        assert old.grad is None
        step = -v_theta.grad  # gradient descent's direction
        assert (sign * (step * (v - v_old)).sum(dim=(1, 2)) > 0).all(), (r, adaptive_weight)
        if not adaptive_weight:  # d/dv_theta of c/beta mean((v_old +- beta (v_theta - v_old) - v)^2) at v_old
            n = v_old[0].numel() * len(v_old)
            torch.testing.assert_close(step, sign * 2 * c / n * (v - v_old), rtol=16 * U64, atol=0)
