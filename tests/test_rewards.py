import numpy as np
import pytest

from ddpo.media import Media
from rewards import RewardError, compute_reward, load_reward
from rewards.jpeg import jpeg_compressibility, jpeg_incompressibility
from tests.float_error import U32


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
    np.testing.assert_array_equal(incompress, -compress)  # the same float32 sizes, negated: exact


def _nan_reward(images, prompts, metadata):
    return np.full(len(images), np.nan), {}


def _short_reward(images, prompts, metadata):
    return np.zeros(len(images) - 1), {}


def _raising_reward(images, prompts, metadata):
    raise ValueError("model exploded")


@pytest.mark.parametrize("fn, message", [
    (_nan_reward, "reward 'r' returned NaN or infinite rewards"),
    (_short_reward, "reward 'r' returned 1 rewards for 2 samples"),
    (_raising_reward, "reward 'r' raised ValueError: model exploded"),
])
def test_broken_rewards_are_named_errors(fn, message):
    with pytest.raises(RewardError) as info:
        compute_reward("r", fn, Media.from_images(_flat_and_noise()), ["a", "b"], [{}, {}])
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


def test_params_are_bound_and_checked():
    images = _flat_and_noise()
    low_quality = load_reward("jpeg_incompressibility", {"quality": 50})
    assert low_quality(images, ["a", "b"], [{}, {}])[0][1] < jpeg_incompressibility(images, ["a", "b"], [{}, {}])[0][1]
    with pytest.raises(RewardError, match=r"^reward.params: 'jpeg_compressibility' does not take these params"):
        load_reward("jpeg_compressibility", {"qualty": 50})
    counter = load_reward("tests.test_rewards:CountingReward", {"offset": 2.0})  # a class: built once
    assert counter(images, ["a", "b"], [{}, {}])[0].tolist() == [2.0, 3.0]


class CountingReward:
    def __init__(self, offset: float = 0.0):
        self.offset = offset

    def __call__(self, images, prompts, metadata):
        return self.offset + np.arange(len(images)), {"answer": [f"image {i}" for i in range(len(images))]}


class FailingToLoadReward:
    def __init__(self, path: str = "/no/such/head.safetensors"):
        raise RewardError(f"reward.params.path: no file '{path}'")

    def __call__(self, images, prompts, metadata):
        raise AssertionError("never built")


def test_weighted_rewards_sum_and_keep_each_terms_extras():
    import pyarrow as pa

    from actors.reward import RewardWorker
    from ddpo.config import load_config
    from ddpo.trajectory import media_column

    config = load_config(None, ["reward.weighted=[{name: jpeg_compressibility, weight: 2.0}, "
                                "{name: 'tests.test_rewards:CountingReward', weight: 0.5, params: {offset: 1.0}}]"])
    worker = RewardWorker(config.reward)
    images = _flat_and_noise()

    def batch(batch_id, rows):
        return pa.RecordBatch.from_pydict({
            "batch_id": [batch_id] * len(rows), "prompt": ["p"] * len(rows), "seed": list(range(len(rows))),
            "policy_version": [0] * len(rows)}).append_column(*media_column(Media.from_images(rows)))

    (id0, r0, info0), (id1, r1, info1) = worker.score(batch("a", images[:1]), batch("b", images[1:]))
    sizes = jpeg_compressibility(images, ["p", "p"], [{}, {}])[0]
    assert (id0, id1) == ("a", "b")
    terms = [2.0 * sizes, 0.5 * np.array([1.0, 2.0])]  # exact in float32: the weights are powers of two
    # the float32 sum of the two terms rounds once: by at most u of the sum of their magnitudes
    assert np.all(np.abs(np.concatenate([r0, r1]) - (terms[0] + terms[1])) <= U32 * (abs(terms[0]) + abs(terms[1])))
    assert info1["tests.test_rewards:CountingReward.answer"] == ["image 1"]
    assert info0["jpeg_compressibility"] == [sizes[0]]  # the term's own float32 reward, unchanged


def brightness_judge(images, prompts, metadata, threshold: float = 0.5):
    """A stand-in judge: the reward is the brightness; it answers and is 'correct' when bright."""
    value = images.reshape(len(images), -1).mean(axis=1) / 255.0
    return value, {"answer": ["bright" if v > threshold else "dark" for v in value],
                   "correct": [float(v > threshold) for v in value]}
