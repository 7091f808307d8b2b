"""SDE windows (Flow-GRPO-Fast, MixGRPO) and ODE-only sampling (DiffusionNFT) on the embedded
flow model: what a windowed trajectory stores, that its log-probs recompute, and where the
epoch plan puts the window."""

import numpy as np
import pytest
import torch

import ddpo.plan
from ddpo.config import FlowConfig, SampleConfig, load_config
from ddpo.rollout import sample_trajectories, step_log_prob
from ddpo.families import take
from ddpo.flow import sde_step_with_logprob
from ddpo.pipeline import load_pipeline
from ddpo.plan import epoch_plan, eval_plan, sde_steps
from ddpo.trajectory import to_record_batch, to_training_batch

PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]
SEEDS = [11, 12]
NUM_STEPS = 8


@pytest.fixture(scope="module")
def model():
    return load_pipeline("builtin:digits-flow")


def _sample_config(sde_type="flow_grpo"):
    return SampleConfig(num_steps=NUM_STEPS, guidance_scale=1.0, height=16, width=16,
                        flow=FlowConfig(noise_level=0.7, sde_type=sde_type))


def _by_hand(model, sample, window: range):
    """The run written out step by step: the Euler step x + (sigma_{i+1} - sigma_i) v of the
    schedule's sigmas outside `window`, the SDE step inside it, each sample's noise from its own
    generator. Returns (every x_i [B, T+1, ...], the window's log-probs [B, S])."""
    timesteps = model.set_timesteps(sample.num_steps, sample.height, sample.width)
    sigmas = model.scheduler.sigmas.float()
    cond, _ = model.encode(PROMPTS, with_negative=False)
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    x = model.initial_latents(generators, sample.height, sample.width)
    xs, log_probs = [x], []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            v = model.predict(x, t, cond, None, sample.guidance_scale)
            if i in window:
                x, log_prob, _, _ = sde_step_with_logprob(model.scheduler, v, t, x, sample.flow.noise_level,
                                                          generator=generators, sde_type=sample.flow.sde_type)
                log_probs.append(log_prob)
            else:
                x = x + (sigmas[i + 1] - sigmas[i]) * v
            xs.append(x)
    return torch.stack(xs, dim=1), (torch.stack(log_probs, dim=1) if log_probs else None)


@pytest.mark.parametrize("sde_type, window", [("flow_grpo", range(3, 6)), ("flow_grpo", range(0, 2)),
                                              ("flow_grpo", range(5, 8)), ("cps", range(2, 5))],
                         ids=["flow_grpo-middle", "flow_grpo-first", "flow_grpo-last", "cps-middle"])
def test_a_window_stores_its_steps_and_their_log_probs_recompute(model, sde_type, window):
    sample = _sample_config(sde_type)
    traj = sample_trajectories(model, PROMPTS, SEEDS, sample, window)
    xs, log_probs = _by_hand(model, sample, window)
    S = len(window)
    assert traj.latents.shape == (2, S + 1, 4, 8, 8) and traj.log_probs.shape == traj.timesteps.shape == (2, S)
    # the same operations on the same inputs: the ODE steps before the window, the window's SDE
    # steps and the ODE steps after it are bit-equal to the run by hand
    torch.testing.assert_close(traj.latents, xs[:, window.start:window.stop + 1], rtol=0, atol=0)
    torch.testing.assert_close(traj.log_probs, log_probs, rtol=0, atol=0)
    timesteps = model.set_timesteps(NUM_STEPS, 16, 16)
    torch.testing.assert_close(traj.timesteps, timesteps[window.start:window.stop].repeat(2, 1), rtol=0, atol=0)
    np.testing.assert_array_equal(traj.media.images, model.decode(xs[:, -1]).images)

    # the learner's recomputation (every stored step of both samples in one batch): ratio 1 within
    # 1e-4, the design's log-prob contract
    cond, _ = model.encode(PROMPTS, with_negative=False)
    rows = torch.arange(2).repeat_interleave(S)
    with torch.no_grad():
        step = step_log_prob(model, traj.latents[:, :-1].flatten(0, 1), traj.latents[:, 1:].flatten(0, 1),
                             traj.timesteps.flatten(), take(cond, rows), None, sample)
    ratio = torch.exp(step.log_prob.reshape(2, S) - traj.log_probs)
    assert (ratio - 1).abs().max() < 1e-4, ratio

    # the Arrow record holds the window alone: S + 1 latents, S log-probs and timesteps
    batch = to_training_batch(to_record_batch(traj, "e0-b0", 0))
    assert batch.latents.shape == (2, S + 1, 4, 8, 8)
    torch.testing.assert_close((batch.latents, batch.log_probs, batch.timesteps),
                               (traj.latents, traj.log_probs, traj.timesteps), rtol=0, atol=0)


def test_ode_only_sampling_stores_the_final_latent_alone(model):
    """DiffusionNFT's sampling (an empty window): every step the ODE's, x_0 alone stored, no
    log-probs, and the whole schedule as the timesteps the learner draws from."""
    sample = _sample_config()
    traj = sample_trajectories(model, PROMPTS, SEEDS, sample, range(0))
    xs, _ = _by_hand(model, sample, range(0))
    assert traj.latents.shape == (2, 1, 4, 8, 8) and traj.log_probs is None
    torch.testing.assert_close(traj.latents[:, 0], xs[:, -1], rtol=0, atol=0)
    np.testing.assert_array_equal(traj.media.images, model.decode(xs[:, -1]).images)
    torch.testing.assert_close(traj.timesteps, model.set_timesteps(NUM_STEPS, 16, 16).repeat(2, 1), rtol=0, atol=0)
    record = to_record_batch(traj, "e0-b0", 0)
    assert "log_probs" not in record.schema.names
    batch = to_training_batch(record)
    assert batch.log_probs is None and batch.latents.shape == (2, 1, 4, 8, 8)
    torch.testing.assert_close(batch.latents, traj.latents, rtol=0, atol=0)


# -- the epoch plan: where each sample batch's window lies ---------------------------------------

def _config(*overrides):
    return load_config("configs/digits_flow.yaml", ["sample.batch_size=8", "sample.num_batches_per_epoch=8",
                                                    "train.batch_size=8", "advantage.group_size=4", *overrides])


def test_sde_steps_are_the_window_every_step_or_none():
    assert sde_steps(_config(), 3) == range(10)
    assert sde_steps(_config("sample.flow.sde_window=2", "sample.flow.sde_window_range=[1, 7]"), 3) == range(3, 5)
    assert sde_steps(_config("train.algorithm=diffusion_nft"), 0) == range(0)


def test_random_windows_lie_in_the_range_and_are_drawn_per_batch():
    config = _config("sample.flow.sde_window=2", "sample.flow.sde_window_range=[1, 7]", "sample.flow.sde_window_schedule=random")
    prompts = config.load_prompts()
    starts = {epoch: [spec.sde_start for spec in epoch_plan(config, prompts, epoch)] for epoch in range(3)}
    for epoch, epoch_starts in starts.items():
        assert all(1 <= start and start + 2 <= 7 for start in epoch_starts), starts
        assert len(set(epoch_starts)) > 1  # each batch its own draw
        assert epoch_plan(config, prompts, epoch) == epoch_plan(config, prompts, epoch)  # deterministic
    assert starts[0] != starts[1] != starts[2]
    assert set().union(*starts.values()) == {1, 2, 3, 4, 5}  # 24 draws reach every start
    assert eval_plan(config, prompts).sde_start == 1  # the range's first step


def test_sliding_window_moves_by_shift_every_interval_then_stays_at_the_end():
    config = _config("sample.flow.sde_window=3", "sample.flow.sde_window_range=[1, 9]", "sample.flow.sde_window_schedule=sliding",
                     "sample.flow.sde_window_shift=2", "sample.flow.sde_window_interval=3")
    prompts = config.load_prompts()
    expected = [1, 1, 1, 3, 3, 3, 5, 5, 5, 6, 6, 6, 6]  # 1 + 2 (epoch // 3), at most 9 - 3
    for epoch, start in enumerate(expected):
        assert {spec.sde_start for spec in epoch_plan(config, prompts, epoch)} == {start}, epoch


@pytest.mark.parametrize("mode", ["group", "batch"])
def test_without_a_window_the_plan_draws_nothing_more(monkeypatch, mode):
    """sde_window = 0 (and a sliding window) take no draw from the plan's generator: the prompts
    and seeds are those of a plan that never asks for a window start."""
    plans = {}
    for window in (["sample.flow.sde_window=0"],
                   ["sample.flow.sde_window=2", "sample.flow.sde_window_range=[1, 7]", "sample.flow.sde_window_schedule=sliding"]):
        config = _config(f"advantage.mode={mode}", *window)
        plans[window[0]] = [(s.batch_id, s.prompts, s.seeds) for e in range(2)
                            for s in epoch_plan(config, config.load_prompts(), e)]
        with monkeypatch.context() as patch:
            patch.setattr(ddpo.plan, "_window_start", lambda *args: 0)  # draws nothing
            untouched = [(s.batch_id, s.prompts, s.seeds) for e in range(2)
                         for s in epoch_plan(config, config.load_prompts(), e)]
        assert plans[window[0]] == untouched
    assert all(spec.sde_start == 0 for spec in epoch_plan(_config(f"advantage.mode={mode}"), _config().load_prompts(), 0))
