"""The learner group: k ranks (gloo on CPU) train as one learner. The numbers do not depend on
k, only the float summation order does: every update of a k = 2 or k = 3 run equals the update
one learner makes from the same state and the same batches, to float tolerance, and a k = 2 run
resumed from its checkpoint equals the uninterrupted k = 2 run bit for bit.

Whole runs of different k are not compared epoch by epoch: after the first update the ranks'
weights differ in their last bits, a pixel of a later epoch rounds the other way, its JPEG
changes by a byte, and from there the runs see different rewards. So each epoch of a k-rank run
is replayed in this process by one learner, from the run's own checkpoint of the epoch before,
on the run's own trajectories of that epoch (`save_latents`)."""

import math

import pytest
import ray
import torch
from safetensors.torch import load_file

from cluster.driver import Driver
from cluster.run_dir import make_run_dir
from ddpo.trajectory import EpochTrajectories, read_parquet
from learner import Learner
from learner.learner import _num_train_steps
from tests.conftest import fit_until_an_actor_dies, one_torch_thread, run_metrics, tiny_config

EPOCHS = 3
# two inner epochs of two minibatches each, gradients accumulated over both: one optimizer
# step per inner epoch; half of each trajectory's steps trained. adam_epsilon 1e-3 (above the
# LoRA gradients' elements) keeps Adam's step a smooth function of the gradient, with slope at
# most lr / eps: with the default 1e-8, a gradient element near 0 (LoRA A's at the second step,
# B starting at 0) is divided by its own size, and a difference in its last bits becomes a step
# of anything up to lr.
SETTINGS = {"num_epochs": EPOCHS, "checkpoint_every": 1, "save_latents": True, "train.num_inner_epochs": 2,
            "train.gradient_accumulation_steps": 2, "train.timestep_fraction": 0.5, "train.adam_epsilon": 1e-3}

# Where every tolerance below comes from: the one float error the suite fixes by contract. Two
# float32 computations of the same log-prob that differ in batch composition, kernels (AVX-512,
# AVX2, plain) or summation order agree to |ratio - 1| < 1e-4 (DESIGN.md; held by
# tests/test_diffusion.py and tests/test_families.py). Everything an update computes is made of
# such log-probs and their gradients, each term off by at most this much of its own size.
RHO = 1e-4


def _steps_trained(config) -> int:
    return _num_train_steps(config.train, config.sample.num_steps)


def _terms_per_gradient(config) -> int:
    """The (sample, step) terms one optimizer step's gradient sums."""
    return config.train.batch_size * _steps_trained(config) * config.train.gradient_accumulation_steps


def assert_the_same_update(metrics: dict, reference: dict, config, label) -> None:
    """One update's diagnostics, computed two ways from the same state and batches."""
    t = config.train
    num_terms = metrics["num_samples"] * _steps_trained(config) * t.num_inner_epochs  # (sample, step) terms
    assert metrics["num_samples"] == reference["num_samples"], label
    assert metrics["policy_version"] == reference["policy_version"], label
    # at lag 0 the stored log-probs are the proximal policy's: every weight is exactly 1
    assert metrics["importance_weight_mean"] == reference["importance_weight_mean"] == 1.0, label
    # loss = mean of w * max(-A r, -A clip(r)) with r within RHO (and the clip) of the other's
    assert metrics["loss"] == pytest.approx(reference["loss"], rel=0,
                                            abs=RHO * (1 + t.clip_range) * reference["advantage_abs_mean"]), label
    # approx_kl = mean of d^2 / 2, d = log r, each d within RHO: |delta| <= RHO mean|d| + RHO^2 / 2,
    # and mean|d| <= sqrt(mean d^2) = sqrt(2 approx_kl)
    kl = reference["approx_kl"]
    assert metrics["approx_kl"] == pytest.approx(kl, rel=0, abs=RHO * math.sqrt(2 * kl) + RHO**2 / 2), label
    # a term's clip can flip only if its ratio lies within RHO of 1 +- clip_range: allow one
    assert metrics["clipfrac"] == pytest.approx(reference["clipfrac"], rel=0, abs=1 / num_terms), label
    # an optimizer step's gradient sums its terms, each within RHO of its size: within
    # terms * RHO of the largest term, which the sum is taken to be no smaller than. A gradient
    # scaled by the rank's share the wrong way is 1/k off: tens of percent.
    assert metrics["grad_norm"] == pytest.approx(reference["grad_norm"], rel=_terms_per_gradient(config) * RHO), label


def weight_atol(metrics: dict, config) -> float:
    """How far one update's LoRA weights may move apart when its gradients differ by their float
    tolerance: Adam's step is lr * m / (sqrt(v) + eps), whose slope in each of m and sqrt(v) is at
    most 1 / eps; m and sqrt(v) are averages of the gradients, each element off by at most the
    gradient's error, terms_per_gradient * RHO * its norm. Summed over the optimizer steps."""
    t = config.train
    num_steps = t.num_inner_epochs * math.ceil(metrics["num_samples"] / (t.batch_size * t.gradient_accumulation_steps))
    return num_steps * 2 * t.learning_rate / t.adam_epsilon * _terms_per_gradient(config) * RHO * metrics["grad_norm"]


def _config(tmp_path, name, num_learners, **extra):
    return tiny_config(tmp_path, run_name=name, **{**SETTINGS, "cluster.num_learners": num_learners, **extra})


def _run(config):
    """The run on Ray; its run directory."""
    run_dir = make_run_dir(config)
    driver = Driver(config, run_dir)
    try:
        driver.fit()
    finally:
        driver.shutdown()
    return run_dir


def _lora(run_dir, epoch):
    return load_file(str(run_dir / "checkpoints" / f"epoch_{epoch:04d}" / "pytorch_lora_weights.safetensors"))


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def replay(config, run_dir, epoch: int) -> tuple[dict, dict, dict, dict]:
    """Epoch `epoch` of a run, trained again by one learner in this process (one torch thread, as
    an actor's): from the run's checkpoint of the epoch before (the initial weights for epoch 0)
    on the batches and rewards the run recorded. Returns its metrics, the LoRA state before and
    after it, and the run's own LoRA after that epoch (its checkpoint), as the same peft state."""
    table = read_parquet(run_dir / "trajectories" / f"epoch_{epoch:04d}.parquet")
    size = config.sample.batch_size
    batches = [table.slice(start, size).combine_chunks().to_batches()[0] for start in range(0, table.num_rows, size)]
    assert [b.column("batch_id")[0].as_py() for b in batches] == list(dict.fromkeys(table["batch_id"].to_pylist()))
    rewards = [b.column("reward").to_numpy() for b in batches]
    with one_torch_thread():
        learner = Learner(config)
        if epoch:
            learner.load_checkpoint(run_dir / "checkpoints" / f"epoch_{epoch - 1:04d}")
        before = learner.weights()[1]
        metrics = learner.train(EpochTrajectories.from_batches([b.drop_columns(["reward"]) for b in batches]), rewards)
    recorded = learner.model.read_lora(run_dir / "checkpoints" / f"epoch_{epoch:04d}")
    return metrics, before, learner.weights()[1], recorded


@pytest.fixture(scope="module")
def two_learners(ray_session, tmp_path_factory):
    """The k = 2 run on Ray: its config and run directory."""
    config = _config(tmp_path_factory.mktemp("group"), "k2", 2)
    return config, _run(config)


def test_every_update_of_a_two_learner_run_is_one_learners_update(two_learners):
    config, run_dir = two_learners
    history = run_metrics(run_dir)
    assert [m["epoch"] for m in history] == list(range(EPOCHS))
    assert [m["policy_version"] for m in history] == list(range(1, EPOCHS + 1))
    first = _lora(run_dir, 0)
    assert any(float(v.abs().max()) > 0 for k, v in first.items() if "lora.up" in k)  # it trained
    for m in history:
        metrics, before, after, recorded = replay(config, run_dir, m["epoch"])
        assert_the_same_update(m, metrics, config, m["epoch"])
        # within the bound, which is under half the update itself: the comparison can fail
        atol = weight_atol(metrics, config)
        assert _max_difference(after, recorded) <= atol < _max_difference(after, before) / 2
    # both ranks worked: the learners' busy fraction is recorded for the run
    assert all(0 < m["busy_learner"] <= 1 for m in history)


def test_three_learners_update_as_one_and_a_dead_rank_is_named(ray_session, two_learners, tmp_path):
    """k = 3 splits each minibatch of 4 samples 2 + 1 + 1; its first update is one learner's.
    Then learner-2 is SIGKILLed while the group trains epoch 1, with no restart allowed
    (cluster.learner_max_restarts = 0): the run ends, naming the rank that died (not rank 0's
    broken all-reduce) and the checkpoint to go on from."""
    import psutil

    config = _config(tmp_path, "k3", 3, num_epochs=20, **{"cluster.learner_max_restarts": 0})
    run_dir = make_run_dir(config)
    driver = Driver(config, run_dir)
    pid = ray.get(driver.learners[2].__ray_call__.remote(lambda self: __import__("os").getpid()))
    message = fit_until_an_actor_dies(driver, run_dir / "metrics.jsonl", 1, psutil.Process(pid).kill)
    assert message == (f"the actor 'learner-2' died and was not restarted; go on from "
                       f"{run_dir / 'checkpoints' / 'epoch_0000'} with: ddpo train --resume {run_dir}")

    first = run_metrics(run_dir)[0]
    assert first["reward_mean"] == run_metrics(two_learners[1])[0]["reward_mean"]  # the same initial weights
    metrics, before, after, recorded = replay(config, run_dir, 0)
    assert_the_same_update(first, metrics, config, 0)
    atol = weight_atol(metrics, config)
    assert _max_difference(after, recorded) <= atol < _max_difference(after, before) / 2


def test_a_rank_killed_mid_run_restarts_the_group_from_the_checkpoint_and_the_run_is_exact(ray_session,
                                                                                            two_learners, tmp_path):
    """SIGKILL learner-1 once epoch 0 is recorded: the driver starts both ranks again, every
    rank loads the checkpoint rank 0 wrote (as `--resume` does), epochs 1 on are redone, and
    the run is bit for bit the undisturbed k = 2 run's (the same processes' kernels), with one
    metrics line per epoch."""
    import psutil

    from tests.conftest import kill_once_recorded

    reference = run_metrics(two_learners[1])
    config = _config(tmp_path, "k2-killed", 2)
    run_dir = make_run_dir(config)
    driver = Driver(config, run_dir)
    pid = ray.get(driver.learners[1].__ray_call__.remote(lambda self: __import__("os").getpid()))
    with kill_once_recorded(run_dir / "metrics.jsonl", 1, psutil.Process(pid).kill):
        try:
            history = driver.fit()
        finally:
            driver.shutdown()
    assert [m["epoch"] for m in run_metrics(run_dir)] == list(range(EPOCHS))
    assert history[-1]["learner_restarts"] == 1
    a, b = _lora(run_dir, EPOCHS - 1), _lora(two_learners[1], EPOCHS - 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for m, expected in zip(history, reference, strict=True):
        for key in ["reward_mean", "loss", "approx_kl", "clipfrac", "grad_norm"]:
            assert m[key] == expected[key], (m["epoch"], key)


def test_timesteps_in_one_forward_is_the_same_update(tmp_path):
    """`train.timesteps_per_forward` batches a minibatch's steps through the UNet together:
    the same loss and gradient, up to the float tolerance of one update."""
    from actors.reward import RewardWorker
    from actors.sampler import Sampler
    from ddpo.plan import epoch_plan

    results = {}
    for per_forward in (1, 3):
        config = tiny_config(tmp_path, **{"train.timesteps_per_forward": per_forward, "train.timestep_fraction": 0.75,
                                          "sample.num_steps": 4, "train.adam_epsilon": 1e-3})
        learner, sampler = Learner(config), Sampler(config)
        sampler.set_weights(learner.weights())
        initial = learner.weights()[1]
        batches = [sampler.sample(s.batch_id, s.prompts, s.seeds) for s in epoch_plan(config, config.load_prompts(), 0)]
        rewards = [r for _, r, _ in RewardWorker(config.reward).score(*[summary for _, summary in batches])]
        metrics = learner.train(EpochTrajectories.from_batches([full for full, _ in batches]), rewards)
        results[per_forward] = metrics, learner.weights()[1]
    (m1, w1), (m3, w3) = results[1], results[3]
    assert_the_same_update(m3, m1, config, "timesteps_per_forward")
    assert _max_difference(w1, w3) <= weight_atol(m1, config) < _max_difference(w1, initial) / 2
