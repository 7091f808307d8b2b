import numpy as np
import pytest

from ddpo.advantages import PerPromptStatTracker, batch_advantages, clip_advantages, group_advantages
from ddpo.plan import epoch_plan
from tests.conftest import tiny_config
from tests.float_error import U64



def test_batch_statistics_until_a_prompt_has_min_count():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    rewards = np.array([1.0, 2.0, 3.0, 10.0])
    adv = tracker.update(["a", "a", "b", "b"], rewards)
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    np.testing.assert_array_equal(adv, expected)  # the same float64 operations on the same numbers


def test_per_prompt_statistics_once_the_buffer_holds_min_count():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    adv = tracker.update(["a", "a", "b", "b"], np.array([1.0, 3.0, 10.0, 20.0]))
    # means 2 and 15, stds 1 and 5 are exact in binary: each advantage is one division, rounded alike here
    np.testing.assert_array_equal(adv, [-1 / (1 + 1e-6), 1 / (1 + 1e-6), -5 / (5 + 1e-6), 5 / (5 + 1e-6)])


def test_buffer_keeps_only_the_last_buffer_size_rewards():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    tracker.update(["a"] * 3, np.array([100.0, 100.0, 100.0]))
    adv = tracker.update(["a"] * 2, np.array([0.0, 2.0]))
    buffer = np.array([100.0, 0.0, 2.0])  # the oldest two 100s fell out
    assert list(tracker.buffers["a"]) == buffer.tolist()
    # the same float64 operations on the same numbers
    np.testing.assert_array_equal(adv, (np.array([0.0, 2.0]) - buffer.mean()) / (buffer.std() + 1e-6))


def test_state_round_trip():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    tracker.update(["a", "b"], np.array([1.0, 2.0]))
    other = PerPromptStatTracker(buffer_size=3, min_count=1)
    other.load_state_dict(tracker.state_dict())
    # the same buffers, so the same float64 operations on the same numbers
    np.testing.assert_array_equal(other.update(["a"], np.array([5.0])), tracker.update(["a"], np.array([5.0])))


def test_batch_advantages_and_clipping():
    rewards = np.array([0.0, 0.0, 0.0, 10.0])
    adv, n, std = batch_advantages(rewards), len(rewards), rewards.std()
    # zero exactly (the mean 2.5 and the deviations are exact in binary); each float64 quotient rounds
    # by u of itself, the n-term sum by (n - 1)·u of Σ|A|: within (n + 1)·u of mean|A|, the terms' scale
    assert abs(adv.mean()) <= (n + 1) * U64 * np.abs(adv).mean()
    # std / (std + 1e-6) exactly: A's std and the rewards' std each within ((n + 5)/2 + 1)·u (A's
    # quotients, the deviations, squares, n-term sum, division and root), the quotient here within u
    assert adv.std() == pytest.approx(std / (std + 1e-6), rel=(n + 8) * U64, abs=0)
    np.testing.assert_array_equal(clip_advantages(np.array([-7.0, 0.5, 9.0]), 5.0), [-5.0, 0.5, 5.0])


def test_group_advantages_by_hand():
    prompts = ["a", "b", "a", "b", "a", "b"]
    rewards = np.array([1.0, 10.0, 2.0, 10.0, 3.0, 13.0])
    adv = group_advantages(prompts, rewards)
    # group a: 1, 2, 3 (mean 2, std sqrt(2/3)); group b: 10, 10, 13 (mean 11, std sqrt(2))
    # the means 2 and 11 and the deviations are exact in binary, std's sum of squares 2 and 6 too:
    # each advantage rounds the same float64 operations as here (2 / x = 2 * (1 / x): a power of two)
    a, b = 1 / (np.sqrt(2 / 3) + 1e-6), 1 / (np.sqrt(2) + 1e-6)
    np.testing.assert_array_equal(adv, [-a, -b, 0, -b, a, 2 * b])
    # global_std: one std for all, the spread of the whole update
    std = rewards.std()
    np.testing.assert_array_equal(group_advantages(prompts, rewards, global_std=True),
                                  np.array([-1, -1, 0, -1, 1, 2]) / (std + 1e-6))


def test_the_group_plan_samples_each_prompt_group_size_times():
    config = tiny_config(None, **{"advantage.mode": "group", "advantage.group_size": 4, "sample.batch_size": 4,
                                  "sample.num_batches_per_epoch": 3, "train.batch_size": 4})
    prompts = config.load_prompts()  # 4 prompts, 3 groups an epoch: 3 different prompts
    for epoch in range(3):
        epoch_prompts = [p for spec in epoch_plan(config, prompts, epoch) for p in spec.prompts]
        groups = [epoch_prompts[i:i + 4] for i in range(0, 12, 4)]
        assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == 3
    seeds = [s for spec in epoch_plan(config, prompts, 0) for s in spec.seeds]
    assert len(set(seeds)) == 12  # a group's samples differ by their seeds


def test_group_size_must_divide_the_epoch():
    from ddpo.config import ConfigError

    with pytest.raises(ConfigError, match=r"^advantage.group_size: must divide the samples per epoch \(4 x 2 = 8\)"):
        tiny_config(None, **{"advantage.mode": "group", "advantage.group_size": 3})
