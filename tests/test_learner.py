"""The learner as a plain class: updates, duplicates, the proximal policy for stale batches."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.reward import RewardWorker
from actors.sampler import Sampler
from ddpo.lora import load_lora_state
from ddpo.plan import epoch_plan, fresh_batches
from ddpo.trajectory import EpochTrajectories, to_training_batch
from learner import Learner
from tests.conftest import tiny_config
from tests.float_error import EPS


def _epoch(config, sampler, epoch):
    batches = [sampler.sample(s.batch_id, s.prompts, s.seeds) for s in epoch_plan(config, config.load_prompts(), epoch)]
    worker = RewardWorker(config.reward)
    return (EpochTrajectories.from_batches([full for full, _ in batches]),
            [rewards for _, rewards, _ in worker.score(*[summary for _, summary in batches])])


def test_update_changes_the_lora_and_counts_duplicates(tmp_path):
    config = tiny_config(tmp_path)
    learner, sampler = Learner(config), Sampler(config)
    sampler.set_weights(learner.weights())
    batches, rewards = _epoch(config, sampler, 0)
    before = learner.weights()[1]
    metrics = learner.train(batches, rewards)
    version, after = learner.weights()
    assert version == metrics["policy_version"] == 1
    assert metrics["num_samples"] == 8 and metrics["duplicate_batches"] == 0
    assert metrics["policy_lag_mean"] == 0.0 and metrics["importance_weight_mean"] == 1.0
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the same batches again (a retried task delivered twice) are not trained on
    again = learner.train(batches, rewards)
    assert again == {"duplicate_batches": 2, "num_samples": 0, "policy_version": 1}
    assert learner.weights()[0] == 1


def test_stale_batches_use_the_proximal_policy(tmp_path):
    """A batch one version old: ratios are taken against recomputed log-probs (ratio 1 at the
    first step, so nothing is clipped), weighted by the truncated importance weight."""
    config = tiny_config(tmp_path, **{"cluster.max_policy_lag": 1})
    learner, sampler = Learner(config), Sampler(config)
    sampler.set_weights(learner.weights())
    first = _epoch(config, sampler, 0)
    stale = _epoch(config, sampler, 1)  # made with version 0, trained at version 1
    learner.train(*first)
    metrics = learner.train(*stale)
    assert metrics["policy_lag_mean"] == 1.0
    assert metrics["importance_weight_mean"] <= 1.0 and metrics["importance_weight_mean"] != 1.0


def test_fresh_batches_drops_older_than_max_lag():
    assert fresh_batches([5, 4, 3, 5], policy_version=5, max_policy_lag=1) == [0, 1, 3]
    assert fresh_batches([5, 4], policy_version=5, max_policy_lag=0) == [0]


def test_each_algorithm_descends_its_own_loss(tmp_path):
    """One update of DDPO-SF, RWR and sparse RWR lowers the loss it was computed on: a second
    learner, the same but for the updated LoRA, scores the same batches with the same plan and
    noise draws (its generator starts where the first one's did). For DDPO-SF the log-probs of the
    high-advantage actions rose against the low ones'; for RWR the weighted denoising error fell."""
    for algorithm, extra in [("ddpo_sf", {}), ("rwr", {}), ("rwr", {"train.rwr_sparse": True})]:
        config = tiny_config(tmp_path, **{"train.algorithm": algorithm, "train.timestep_fraction": 0.5,
                                          "train.timestep_selection": "earliest", "advantage.mode": "batch",
                                          "train.gradient_accumulation_steps": 2, **extra})
        learner, sampler = Learner(config), Sampler(config)
        sampler.set_weights(learner.weights())
        batches = _epoch(config, sampler, 0)
        before = learner.train(*batches)  # 8 samples, 2 minibatches, one optimizer step after both
        assert before["num_samples"] == 8
        if algorithm == "ddpo_sf":
            assert before["loss"] == pytest.approx(**_reinforce_loss(batches, steps=2))
        updated = Learner(config)
        load_lora_state(updated.model.denoiser, learner.weights()[1])
        after = updated.train(*batches)
        # Adam's first step moves each weight by lr against its gradient's sign: to first order the
        # loss falls by lr ||g||_1 >= lr ||g||_2 = lr grad_norm (float32's rounding of the losses is far smaller)
        assert before["loss"] - after["loss"] > config.train.learning_rate * before["grad_norm"], (algorithm, extra)


def _reinforce_loss(batches, steps):
    """DDPO-SF's loss by hand, on-policy before any optimizer step: -mean A_i log p(x_j-1 | x_j) over
    every sample i and its first `steps` steps j, with A the batch's normalised rewards and log p
    the sampler's; as pytest.approx's arguments."""
    epoch, rewards = batches
    log_probs = to_training_batch(pa.Table.from_batches(epoch.fetch(range(len(rewards))))).log_probs.double()
    rewards = np.concatenate(rewards)
    advantages = torch.as_tensor(np.clip((rewards - rewards.mean()) / (rewards.std() + 1e-6), -5, 5))[:, None]
    terms = -advantages * log_probs[:, :steps]
    # the learner's log-probs are recomputed: within 1e-4 of the sampler's (the design's contract,
    # tests/test_diffusion.py), plus the float32 rounding of a mean of n terms
    return {"expected": float(terms.mean()),
            "abs": float(advantages.abs().mean()) * 1e-4 + terms.numel() * EPS * float(terms.abs().mean())}


def test_earliest_timestep_selection_trains_only_the_noisiest_steps(tmp_path):
    trained = {}
    for selection in ("random", "earliest"):
        config = tiny_config(tmp_path, **{"train.timestep_fraction": 0.5, "train.timestep_selection": selection})
        learner, sampler = Learner(config), Sampler(config)
        sampler.set_weights(learner.weights())
        steps, log_prob = [], learner._log_prob

        def recording_log_prob(batch, idx, step, *args, **kwargs):
            steps.append(step.flatten().clone())
            return log_prob(batch, idx, step, *args, **kwargs)

        learner._log_prob = recording_log_prob
        learner.train(*_epoch(config, sampler, 0))
        trained[selection] = torch.cat(steps)
    num_steps, num_train = config.sample.num_steps, config.sample.num_steps // 2
    assert len(trained["earliest"]) == len(trained["random"]) == 8 * num_train
    # the first half of the denoising steps (the noisiest), each sample's in shuffled order
    assert set(trained["earliest"].tolist()) == set(range(num_train))
    assert trained["random"].max() >= num_train and trained["random"].max() < num_steps


def test_the_kl_to_the_reference_starts_at_zero_and_pulls_back(tmp_path):
    """The reference is the same network with the adapter off: before the first optimizer step
    the LoRA is the identity, so the KL is exactly 0 (and so is its gradient); after training it
    is positive, and from the second update on a large beta pulls the policy back towards the
    reference, measured at the start of the third."""
    kl_after = {}
    for beta in (0.0, 1e4):
        config = tiny_config(tmp_path, **{"train.kl_coef": 1e-9 if beta == 0 else beta, "train.batch_size": 8,
                                           "train.learning_rate": 3e-2})
        learner, sampler = Learner(config), Sampler(config)
        sampler.set_weights(learner.weights())
        first = learner.train(*_epoch(config, sampler, 0))  # one minibatch: one optimizer step
        assert first["kl_ref"] == 0.0
        for epoch in (1, 2):
            sampler.set_weights(learner.weights())
            kl_after[beta] = learner.train(*_epoch(config, sampler, epoch))["kl_ref"]
    assert kl_after[0.0] > 0 and kl_after[1e4] < kl_after[0.0]


def test_a_checkpoint_is_whole_or_absent(tmp_path, monkeypatch):
    """A checkpoint is written aside and renamed: a write that fails part-way (a full disk)
    leaves no checkpoint folder for that epoch and no partial one, and the one before it loads."""
    import errno

    import learner.learner as learner_module
    from cluster.run_dir import latest_checkpoint

    learner = Learner(tiny_config(tmp_path))
    root = tmp_path / "run" / "checkpoints"
    learner.policy_version = 1
    first = learner.save_checkpoint(root)
    assert first == root / "epoch_0000" and latest_checkpoint(tmp_path / "run") == first
    saved = {path.name: path.read_bytes() for path in first.iterdir()}
    assert learner.save_checkpoint(root) == first  # this version's again (after Ctrl-C): left as it is

    def disk_full(tensors, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)  # part of the file made it
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(learner_module, "save_file", disk_full)
    learner.policy_version = 2
    with pytest.raises(OSError, match="No space left"):
        learner.save_checkpoint(root)
    assert sorted(path.name for path in root.iterdir()) == ["epoch_0000"]
    assert latest_checkpoint(tmp_path / "run") == first
    assert {path.name: path.read_bytes() for path in first.iterdir()} == saved
    assert Learner(tiny_config(tmp_path)).load_checkpoint(first) == 1


def test_logprob_mismatch_is_reported_and_catches_stored_log_probs_that_are_off(tmp_path):
    """`logprob_mismatch_max`, max |ratio - 1| on the first minibatch before any update: within
    the design's 1e-4 at lag 0, and 1 - e^-0.01 (within that 1e-4) when every stored log-prob is
    0.01 too high."""
    import math

    small = {"sample.num_batches_per_epoch": 1, "train.timestep_fraction": 0.5}  # one minibatch, 2 of 4 steps
    sampler = Sampler(tiny_config(tmp_path, **small))
    batches = None
    for algorithm in ("ddpo_is", "ddpo_sf"):
        config = tiny_config(tmp_path, **{"train.algorithm": algorithm, **small})
        for shift in (0.0, 0.01):
            learner = Learner(config)  # the same initial LoRA as every learner's: the batches are on-policy
            if batches is None:
                sampler.set_weights(learner.weights())
                batches = _epoch(config, sampler, 0)
            fetch_rows = learner._fetch_rows

            def shifted(*args, fetch_rows=fetch_rows, shift=shift):
                batch = fetch_rows(*args)
                batch.log_probs += shift
                return batch

            learner._fetch_rows = shifted
            mismatch = learner.train(*batches)["logprob_mismatch_max"]
            assert abs(mismatch - (1 - math.exp(-shift))) <= 1e-4, (algorithm, shift, mismatch)


def test_logprob_mismatch_of_flow_sde_windows(tmp_path):
    """CPS in a random SDE window of the flow model, two sample batches with windows at different
    steps in one update: the learner rescores each stored step at its own timestep (ratio 1 within
    1e-4); a learner that took the wrong step's timestep would be far off."""
    from ddpo.config import load_config

    config = load_config("configs/digits_flow.yaml", [
        "sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.batch_size=8", "advantage.group_size=4",
        "sample.flow.sde_type=cps", "sample.flow.sde_window=3", "sample.flow.sde_window_range=[1, 9]", "eval_images=0",
        "train.timestep_fraction=1.0", f"output_dir={tmp_path}"])
    learner, sampler = Learner(config), Sampler(config)
    sampler.set_weights(learner.weights())
    specs = epoch_plan(config, config.load_prompts(), 1)
    assert [spec.sde_start for spec in specs] == [2, 5]  # this seed's draws: two windows, apart
    batches = [sampler.sample(s.batch_id, s.prompts, s.seeds, s.sde_start)[0] for s in specs]
    rewards = [np.random.default_rng(b).random(4) for b in range(2)]
    metrics = learner.train(EpochTrajectories.from_batches(batches), rewards)
    assert metrics["logprob_mismatch_max"] <= 1e-4
    assert learner.num_steps == 3


def test_a_mismatch_above_1e_3_warns_once_naming_the_causes(tmp_path, capsys):
    from cluster.run_dir import MISMATCH_WARN, RunRecorder

    recorder = RunRecorder(tmp_path)
    try:
        for epoch, mismatch in enumerate([None, 2e-5, MISMATCH_WARN, 5e-3, 2e-2]):
            recorder.warn_on_mismatch(epoch, mismatch)
    finally:
        recorder.tensorboard.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines  # above the threshold, the first time only
    assert lines[0].startswith("warning: epoch 3:") and "5.0e-03" in lines[0]
    assert all(cause in lines[0] for cause in ("dtype", "train.cfg", "attention backend"))
