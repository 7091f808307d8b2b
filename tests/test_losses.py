"""Each loss on a small hand-worked case, with clipping active and inactive."""

import math

import pytest
import torch

from ddpo.losses import ddpo_is_loss, ddpo_sf_loss, importance_weight, kl_to_reference, rwr_loss, rwr_weights


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
