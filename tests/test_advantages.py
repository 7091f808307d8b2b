import numpy as np
import pytest

from ddpo.advantages import PerPromptStatTracker, batch_advantages, clip_advantages


def test_batch_statistics_until_a_prompt_has_min_count():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    rewards = np.array([1.0, 2.0, 3.0, 10.0])
    adv = tracker.update(["a", "a", "b", "b"], rewards)
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    np.testing.assert_allclose(adv, expected)


def test_per_prompt_statistics_once_the_buffer_holds_min_count():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    adv = tracker.update(["a", "a", "b", "b"], np.array([1.0, 3.0, 10.0, 20.0]))
    np.testing.assert_allclose(adv, [-1, 1, -1, 1], atol=1e-5)


def test_buffer_keeps_only_the_last_buffer_size_rewards():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    tracker.update(["a"] * 3, np.array([100.0, 100.0, 100.0]))
    adv = tracker.update(["a"] * 2, np.array([0.0, 2.0]))
    buffer = np.array([100.0, 0.0, 2.0])  # the oldest two 100s fell out
    assert list(tracker.buffers["a"]) == buffer.tolist()
    np.testing.assert_allclose(adv, (np.array([0.0, 2.0]) - buffer.mean()) / (buffer.std() + 1e-6))


def test_state_round_trip():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    tracker.update(["a", "b"], np.array([1.0, 2.0]))
    other = PerPromptStatTracker(buffer_size=3, min_count=1)
    other.load_state_dict(tracker.state_dict())
    np.testing.assert_allclose(other.update(["a"], np.array([5.0])), tracker.update(["a"], np.array([5.0])))


def test_batch_advantages_and_clipping():
    adv = batch_advantages(np.array([0.0, 0.0, 0.0, 10.0]))
    assert adv.mean() == pytest.approx(0.0, abs=1e-9)
    assert adv.std() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(clip_advantages(np.array([-7.0, 0.5, 9.0]), 5.0), [-5.0, 0.5, 5.0])
