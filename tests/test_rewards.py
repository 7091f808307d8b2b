import numpy as np
import pytest

from rewards import RewardError, compute_reward, load_reward
from rewards.jpeg import jpeg_compressibility, jpeg_incompressibility


def _flat_and_noise():
    flat = np.full((1, 64, 64, 3), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    return np.concatenate([flat, noise])


def test_jpeg_rewards_prefer_flat_or_noisy_images():
    images = _flat_and_noise()
    compress, info = jpeg_compressibility(images, ["a", "b"], [{}, {}])
    assert compress[0] > compress[1]  # a flat image compresses better than noise
    assert info["jpeg_kb"][1] > 5.0  # 64x64 RGB noise at quality 95 is several kB
    incompress, _ = jpeg_incompressibility(images, ["a", "b"], [{}, {}])
    np.testing.assert_allclose(incompress, -compress)


def _nan_reward(images, prompts, metadata):
    return np.full(len(images), np.nan), {}


def _short_reward(images, prompts, metadata):
    return np.zeros(len(images) - 1), {}


def _raising_reward(images, prompts, metadata):
    raise ValueError("model exploded")


@pytest.mark.parametrize("fn, message", [
    (_nan_reward, "reward 'r' returned NaN or infinite rewards"),
    (_short_reward, "reward 'r' returned 1 rewards for 2 images"),
    (_raising_reward, "reward 'r' raised ValueError: model exploded"),
])
def test_broken_rewards_are_named_errors(fn, message):
    with pytest.raises(RewardError) as info:
        compute_reward("r", fn, _flat_and_noise(), ["a", "b"], [{}, {}])
    assert str(info.value) == message


def test_registry_and_plugins():
    assert load_reward("jpeg_compressibility") is jpeg_compressibility
    assert load_reward("tests.test_rewards:_nan_reward") is _nan_reward
    with pytest.raises(RewardError, match="^reward.name: unknown reward 'aesthetics'; choose one of"):
        load_reward("aesthetics")
    with pytest.raises(RewardError, match="^reward.name: cannot import module 'no_such_module'"):
        load_reward("no_such_module:fn")
    with pytest.raises(RewardError, match="^reward.name: module 'rewards.jpeg' has no function 'nope'"):
        load_reward("rewards.jpeg:nope")
