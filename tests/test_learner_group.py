"""The learner group: k ranks (gloo on CPU) train as one learner. The numbers do not depend on
k, only the float summation order does: k = 2 or 3 must equal k = 1 to float tolerance, and a
k = 2 run resumed from its checkpoint must equal the uninterrupted k = 2 run bit for bit."""

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

from cluster.driver import Driver
from cluster.inprocess import InProcessRun
from cluster.run_dir import make_run_dir
from tests.conftest import fit_until_an_actor_dies, one_torch_thread, run_metrics, tiny_config

EPOCHS = 3
# two inner epochs of two minibatches each, gradients accumulated over both: one optimizer
# step per inner epoch; half of each trajectory's steps trained
SETTINGS = {"num_epochs": EPOCHS, "checkpoint_every": 1, "train.num_inner_epochs": 2,
            "train.gradient_accumulation_steps": 2, "train.timestep_fraction": 0.5}
# Measured here after the first update (two AdamW steps of lr 3e-3, so up to 6e-3 per weight):
# at most 3.4e-6 apart for k = 2 and 2.2e-5 for k = 3, in LoRA A matrices. Their gradient is 0
# at the first step (B starts at 0) and of the order of adam_epsilon at the second, where
# Adam's g / (sqrt(v) + eps) turns the float summation order (grad_norm agrees to 2e-7) into a
# part of the step; with adam_epsilon 1e-3 the weights agree to 2.4e-8 (k = 2) and 3.8e-8 (k =
# 3). Adam hides a wrongly scaled gradient, so grad_norm and the loss are held tight below.
WEIGHT_ATOL = 1e-4
# the epochs' metrics, k = 2 against k = 1 (largest difference measured here over 3 epochs):
# rewards identical, loss 5.4e-8 (a mean of O(1) terms that cancel), approx_kl 3e-11 (values
# of 2e-7 to 3e-6), grad_norm 6e-6 relative, clipfrac and importance weights identical
TOLERANCE = {"reward_mean": {"rel": 1e-6}, "reward_std": {"rel": 1e-6}, "loss": {"abs": 1e-6},
             "approx_kl": {"abs": 1e-9}, "clipfrac": {"abs": 1e-9}, "grad_norm": {"rel": 1e-4},
             "importance_weight_mean": {"abs": 1e-9}}
# After the first update the ranks' weights differ by float rounding (above), which can round a
# pixel of a later epoch's images the other way and change its JPEG by a byte or two. Here the
# later epochs still came out within TOLERANCE; what they are held to is what such a flip can
# move: 1e-3 kB of reward, its share of the normalised advantages in the loss, one clipped term.
RUN_TOLERANCE = {"reward_mean": {"abs": 1e-3}, "reward_std": {"abs": 1e-3}, "loss": {"abs": 1e-3},
                 "approx_kl": {"rel": 1e-2, "abs": 1e-9}, "clipfrac": {"abs": 0.05}, "grad_norm": {"rel": 1e-2},
                 "importance_weight_mean": {"abs": 1e-9}}


def _run(tmp_path, name, num_learners):
    config = tiny_config(tmp_path, run_name=name, **{**SETTINGS, "cluster.num_learners": num_learners})
    driver = Driver(config, make_run_dir(config))
    try:
        return driver.fit()
    finally:
        driver.shutdown()


def _lora(tmp_path, name, epoch):
    return load_file(str(tmp_path / name / "checkpoints" / f"epoch_{epoch:04d}" / "pytorch_lora_weights.safetensors"))


def _distance(a, b):
    """The L2 norm of the difference of two LoRA states."""
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """The k = 1 run, as the same classes composed in this process (a lag-0 Ray run with one
    learner equals it bit for bit: tests/test_system.py), and the k = 2 run on Ray."""
    tmp_path = tmp_path_factory.mktemp("group")
    config = tiny_config(tmp_path, run_name="k1", **SETTINGS)
    with one_torch_thread():
        one = InProcessRun(config, make_run_dir(config)).fit()
    return tmp_path, {1: one, 2: _run(tmp_path, "k2", 2)}


def test_one_update_with_two_or_three_learners_equals_one_learner_and_a_dead_rank_is_named(ray_session, runs,
                                                                                        tmp_path):
    """The first update trains on the same samples (the same initial weights): k = 2 splits each
    minibatch of 4 samples 2 + 2, k = 3 splits it 2 + 1 + 1. Then learner-2 is SIGKILLed while
    the group trains epoch 1, with no restart allowed (cluster.learner_max_restarts = 0): the
    run ends, naming the rank that died (not rank 0's broken all-reduce) and the checkpoint to
    go on from."""
    import psutil

    group_path, histories = runs
    config = tiny_config(tmp_path, run_name="k3", **{**SETTINGS, "num_epochs": 20, "cluster.num_learners": 3,
                                                     "cluster.learner_max_restarts": 0})
    driver = Driver(config, make_run_dir(config))
    pid = ray.get(driver.learners[2].__ray_call__.remote(lambda self: __import__("os").getpid()))
    metrics_path = tmp_path / "k3" / "metrics.jsonl"
    message = fit_until_an_actor_dies(driver, metrics_path, 1, psutil.Process(pid).kill)
    assert message == (f"the actor 'learner-2' died and was not restarted; go on from "
                       f"{tmp_path / 'k3' / 'checkpoints' / 'epoch_0000'} with: ddpo train --resume {tmp_path / 'k3'}")

    histories[3] = run_metrics(tmp_path / "k3")[:1]
    one = _lora(group_path, "k1", 0)
    assert any(float(v.abs().max()) > 0 for k, v in one.items() if "lora.up" in k)  # it trained
    for k, path in [(2, group_path), (3, tmp_path)]:
        assert _max_difference(one, _lora(path, f"k{k}", 0)) < WEIGHT_ATOL, k
        first, reference = histories[k][0], histories[1][0]
        assert first["reward_mean"] == reference["reward_mean"]  # the same samples
        assert first["num_samples"] == reference["num_samples"] == 8
        for key, tolerance in TOLERANCE.items():
            assert first[key] == pytest.approx(reference[key], **tolerance), (k, key)


def test_a_lag0_run_with_two_learners_reproduces_the_one_learner_run(runs):
    tmp_path, histories = runs
    for one, two in zip(histories[1], histories[2], strict=True):
        assert two["policy_version"] == one["policy_version"]
        for key, tolerance in (TOLERANCE if one["epoch"] == 0 else RUN_TOLERANCE).items():
            assert two[key] == pytest.approx(one[key], **tolerance), (one["epoch"], key)
    # the final LoRAs: apart by about 1e-5 of the run's update here (in norm); a pixel
    # rounded the other way could turn a near-zero gradient's Adam step, so 1% is what is held
    one, two, first = (_lora(tmp_path, name, epoch) for name, epoch in [("k1", EPOCHS - 1), ("k2", EPOCHS - 1),
                                                                         ("k1", 0)])
    assert _distance(two, one) < 1e-2 * _distance(one, first)
    # both ranks worked: the learners' busy fraction is recorded for the run
    assert all(0 < m["busy_learner"] <= 1 for m in histories[2])


def test_a_rank_killed_mid_run_restarts_the_group_from_the_checkpoint_and_the_run_is_exact(ray_session, runs):
    """SIGKILL learner-1 once epoch 0 is recorded: the driver starts both ranks again, every
    rank loads the checkpoint rank 0 wrote (as `--resume` does), epochs 1 on are redone, and
    the run is bit for bit the undisturbed k = 2 run's, with one metrics line per epoch."""
    import psutil

    from tests.conftest import kill_once_recorded

    tmp_path, histories = runs
    config = tiny_config(tmp_path, run_name="k2-killed", **{**SETTINGS, "cluster.num_learners": 2})
    driver = Driver(config, make_run_dir(config))
    pid = ray.get(driver.learners[1].__ray_call__.remote(lambda self: __import__("os").getpid()))
    with kill_once_recorded(tmp_path / "k2-killed" / "metrics.jsonl", 1, psutil.Process(pid).kill):
        try:
            history = driver.fit()
        finally:
            driver.shutdown()
    assert [m["epoch"] for m in run_metrics(tmp_path / "k2-killed")] == list(range(EPOCHS))
    assert history[-1]["learner_restarts"] == 1
    a, b = _lora(tmp_path, "k2-killed", EPOCHS - 1), _lora(tmp_path, "k2", EPOCHS - 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for m, reference in zip(history, histories[2], strict=True):
        for key in ["reward_mean", "loss", "approx_kl", "clipfrac", "grad_norm"]:
            assert m[key] == reference[key], (m["epoch"], key)


def test_timesteps_in_one_forward_is_the_same_update(tmp_path):
    """`train.timesteps_per_forward` batches a minibatch's steps through the UNet together:
    the same loss and gradient, up to float summation order."""
    from actors.reward import RewardWorker
    from actors.sampler import Sampler
    from ddpo.plan import epoch_plan
    from ddpo.trajectory import EpochTrajectories
    from learner import Learner

    results = {}
    for per_forward in (1, 3):
        config = tiny_config(tmp_path, **{"train.timesteps_per_forward": per_forward, "train.timestep_fraction": 0.75,
                                          "sample.num_steps": 4})
        learner, sampler = Learner(config), Sampler(config)
        sampler.set_weights(learner.weights())
        batches = [sampler.sample(s.batch_id, s.prompts, s.seeds) for s in epoch_plan(config, config.load_prompts(), 0)]
        rewards = [r for _, r, _ in RewardWorker(config.reward).score(*[summary for _, summary in batches])]
        metrics = learner.train(EpochTrajectories.from_batches([full for full, _ in batches]), rewards)
        results[per_forward] = metrics, learner.weights()[1]
    (m1, w1), (m3, w3) = results[1], results[3]
    for key in ["loss", "approx_kl", "clipfrac", "grad_norm"]:
        assert m3[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-9), key
    assert _max_difference(w1, w3) < WEIGHT_ATOL
    assert not np.isnan(m3["loss"])
