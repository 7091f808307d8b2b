"""The DiffusionNFT learner on the embedded flow model: the old policy's EMA, which adapter the
samplers get, and a checkpoint that resumes bit for bit."""

import numpy as np
import pytest
import torch

from actors.sampler import Sampler
from ddpo.config import load_config
from ddpo.lora import active_adapter, get_lora_state
from ddpo.plan import epoch_plan
from ddpo.trajectory import EpochTrajectories
from learner import Learner
from learner.learner import OLD
from tests.float_error import EPS


def _config(tmp_path):
    return load_config("configs/digits_flow.yaml", [
        "sample.batch_size=8", "sample.num_batches_per_epoch=1", "train.batch_size=8", "advantage.group_size=4",
        "train.algorithm=diffusion_nft", "eval_images=0", f"output_dir={tmp_path}"])


def _epoch(config, sampler, epoch):
    """An epoch's trajectories (the plain ODE's x_0) and made-up rewards."""
    specs = epoch_plan(config, config.load_prompts(), epoch)
    batches = [sampler.sample(spec.batch_id, spec.prompts, spec.seeds, spec.sde_start)[0] for spec in specs]
    rewards = [np.random.default_rng(epoch * 100 + b).random(len(spec.prompts)) for b, spec in enumerate(specs)]
    return EpochTrajectories.from_batches(batches), rewards


def _states(learner):
    denoiser = learner.model.denoiser
    return get_lora_state(denoiser), get_lora_state(denoiser, OLD)


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = _config(tmp_path_factory.mktemp("nft"))
    return config, Sampler(config)


def test_the_old_policy_is_an_ema_of_the_trained_one_and_is_what_samples(setup):
    config, sampler = setup
    learner = Learner(config)
    trained, old = _states(learner)
    _assert_equal(old, trained)  # the old policy starts as the trained adapter's copy
    for epoch, steps in ((0, 1), (1, 2)):  # one minibatch an update: one optimizer step
        sampler.set_weights(learner.weights())
        _, old_before = _states(learner)
        metrics = learner.train(*_epoch(config, sampler, epoch))
        trained, old = _states(learner)
        assert learner.optimizer_steps == steps
        d = min(config.train.nft_decay_rate * steps, config.train.nft_decay_max)
        assert metrics["nft_decay"] == d
        # old <- d old + (1 - d) trained, in float32: a rounding of each product and of the sum
        for key in old:
            exact = d * old_before[key].double() + (1 - d) * trained[key].double()
            bound = 2 * EPS * (d * old_before[key].double().abs() + (1 - d) * trained[key].double().abs())
            assert ((old[key].double() - exact).abs() <= bound).all(), key
        assert any(not torch.equal(old[k], trained[k]) for k in old)
        # the samplers get the old policy
        version, state = learner.weights()
        assert version == metrics["policy_version"] == epoch + 1
        _assert_equal(state, old)

    # the velocity v_old the loss uses is the old adapter's: what a sampler holding weights() predicts
    sampler.set_weights(learner.weights())
    g = torch.Generator().manual_seed(0)
    x, timestep = torch.randn(2, 4, 8, 8, generator=g), sampler.model.set_timesteps(10, 16, 16)[3]
    cond, _ = learner.model.encode(["a handwritten digit one", "a handwritten digit two"], with_negative=False)
    with torch.no_grad():
        with active_adapter(learner.model.denoiser, OLD):
            v_old = learner.model.predict(x, timestep, cond, None, 1.0)
        v_theta = learner.model.predict(x, timestep, cond, None, 1.0)
        v_sampler = sampler.model.predict(x, timestep, cond, None, 1.0)
    torch.testing.assert_close(v_old, v_sampler, rtol=0, atol=0)
    assert not torch.equal(v_old, v_theta)
    # and the trained adapter is the active (and only trainable) one again
    assert all(".default." in name for name, p in learner.model.denoiser.named_parameters() if p.requires_grad)


def test_a_checkpoint_restores_both_adapters_and_resumes_bit_for_bit(setup, tmp_path):
    config, sampler = setup
    first = Learner(config)
    sampler.set_weights(first.weights())
    first.train(*_epoch(config, sampler, 0))
    path = first.save_checkpoint(tmp_path / "checkpoints")
    saved = _states(first)
    sampler.set_weights(first.weights())
    next_epoch = _epoch(config, sampler, 1)
    uninterrupted = first.train(*next_epoch)

    resumed = Learner(config)
    assert resumed.load_checkpoint(path) == 1
    assert resumed.optimizer_steps == 1
    for ours, theirs in zip(_states(resumed), saved):
        _assert_equal(ours, theirs)
    again = resumed.train(*next_epoch)
    assert again == uninterrupted  # the same loss, decay, grad norm, to the bit
    for ours, theirs in zip(_states(resumed), _states(first)):
        _assert_equal(ours, theirs)
    assert resumed.optimizer_steps == first.optimizer_steps == 2


def test_a_colocated_worker_samples_with_the_old_policy_read_in_place(setup):
    """A device's worker (one model) samples with the policy a separate sampler is sent, read in
    place: after an update, DiffusionNFT's old adapter, bit for bit as the sampler given the
    broadcast weights; not the trained adapter, which differs from it."""
    from actors.worker import ColocatedWorker

    config, sampler = setup
    worker = ColocatedWorker(config)
    worker.train(*_epoch(config, worker, 0))
    spec = epoch_plan(config, config.load_prompts(), 1)[0]
    args = spec.batch_id, spec.prompts, spec.seeds, spec.sde_start
    sampler.set_weights(worker.weights())
    in_place = worker.sample(*args)[0]
    assert in_place.equals(sampler.sample(*args)[0])
    sampler.set_weights((worker.policy_version + 1, get_lora_state(worker.model.denoiser)))  # the trained adapter
    assert in_place.column("latents") != sampler.sample(*args)[0].column("latents")
