"""Rewards of clips: an image reward scores every frame and a clip gets its frames' mean or
min (`reward.frame_reduction`), its info per clip; the `temporal_consistency` reward on a tiny
random CLIP; the reward worker passes the config's reduction on."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.reward import RewardWorker
from ddpo.config import RewardConfig
from ddpo.media import Media
from ddpo.trajectory import media_column
from rewards import RewardError, check_reward, compute_reward, load_reward
from tests.test_pickscore import save_tiny_clip

RNG = np.random.default_rng(0)
CLIPS = RNG.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)  # 2 clips of 3 frames
PROMPTS, METADATA = ["a cat", "a dog"], [{"seed": 0}, {"seed": 1}]
CALLS = []


def _brightness(images, prompts, metadata):
    """A frame's mean pixel, with numeric and text extras; records what it was given."""
    CALLS.append((images.shape, list(prompts), list(metadata)))
    scores = images.reshape(len(images), -1).mean(axis=1)
    return scores, {"bright": [bool(s > 127) for s in scores], "answer": [f"{s:.1f}" for s in scores],
                    "pixels": [int(images[i].size) for i in range(len(images))]}


def _one_short(images, prompts, metadata):
    return np.zeros(len(images) - 1), {}


def _motion(frames, prompts, metadata):
    return np.abs(np.diff(frames.astype(np.float32), axis=1)).mean(axis=(1, 2, 3, 4)), {}


_motion.medium = "video"


@pytest.mark.parametrize("reduction", ["mean", "min"])
def test_an_image_reward_scores_every_frame_and_reduces_over_them(reduction):
    CALLS.clear()
    rewards, info = compute_reward("brightness", _brightness, Media.from_videos(CLIPS, fps=16), PROMPTS, METADATA,
                                   frame_reduction=reduction)
    # one call on the 2 * 3 frames, each with its clip's prompt and metadata and its own index
    (shape, prompts, metadata), = CALLS
    assert shape == (6, 8, 8, 3)
    assert prompts == ["a cat"] * 3 + ["a dog"] * 3
    assert metadata == [{"seed": s, "frame": f} for s in (0, 1) for f in range(3)]
    per_frame = CLIPS.reshape(2, 3, -1).astype(np.float32).mean(axis=2)
    np.testing.assert_allclose(rewards, getattr(per_frame, reduction)(axis=1), rtol=1e-6)
    assert rewards.dtype == np.float32 and rewards.shape == (2,)
    # per clip: numbers (and bools) averaged over the frames, text from the clip's lowest-scoring frame
    np.testing.assert_allclose(info["bright"], (per_frame > 127).mean(axis=1))
    assert info["pixels"] == [192.0, 192.0]
    assert info["answer"] == [f"{per_frame[c].min():.1f}" for c in range(2)]


def test_a_clip_of_one_frame_scores_as_its_image():
    clips = CLIPS[:, :1]
    rewards, _ = compute_reward("brightness", _brightness, Media.from_videos(clips, fps=16), PROMPTS, METADATA)
    images, _ = compute_reward("brightness", _brightness, Media.from_images(clips[:, 0]), PROMPTS, METADATA)
    np.testing.assert_array_equal(rewards, images)


def test_broken_rewards_on_frames_and_mediums_refused_are_named_errors():
    clips = Media.from_videos(CLIPS, fps=16)
    with pytest.raises(RewardError) as err:
        compute_reward("short", _one_short, clips, PROMPTS, METADATA)
    assert str(err.value) == "reward 'short' returned 5 rewards for 6 frames"
    with pytest.raises(RewardError, match="^reward.frame_reduction: must be one of"):
        compute_reward("brightness", _brightness, clips, PROMPTS, METADATA, frame_reduction="max")
    with pytest.raises(RewardError) as err:
        compute_reward("motion", _motion, Media.from_images(CLIPS[:, 0]), PROMPTS, METADATA)
    assert str(err.value) == "reward 'motion' scores videos, and the model makes images: choose a reward of images"


def _batch(media: Media, batch_id: str) -> pa.RecordBatch:
    rows = len(media)
    batch = pa.RecordBatch.from_pydict({"batch_id": [batch_id] * rows, "seed": list(range(rows)),
                                        "policy_version": [0] * rows, "prompt": PROMPTS[:rows]})
    return batch.append_column(*media_column(media))


def test_the_reward_worker_passes_reward_frame_reduction_on():
    clips = Media.from_videos(CLIPS, fps=16)
    per_frame = CLIPS.reshape(2, 3, -1).astype(np.float32).mean(axis=2)
    for reduction in ("mean", "min"):
        worker = RewardWorker(RewardConfig(name="tests.test_video_rewards:_brightness", frame_reduction=reduction))
        (batch_id, rewards, info), = worker.score(_batch(clips, "b0"))
        assert batch_id == "b0" and sorted(info) == ["answer", "bright", "pixels"]
        np.testing.assert_allclose(rewards, getattr(per_frame, reduction)(axis=1), rtol=1e-6)


# -- temporal_consistency -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tests' tiny random CLIP (32x32 images), saved in `model/` with its image processor in
    `processor/`; returns (params, model)."""
    folder = tmp_path_factory.mktemp("temporal")
    clip, _ = save_tiny_clip(folder)
    params = {"clip_model": str(folder / "model"), "processor": str(folder / "processor"), "device": "cpu"}
    return params, clip


def _unrelated_frames(count: int, size: int = 32) -> np.ndarray:
    """Frames with nothing in common: each a different colour, pattern and brightness."""
    y, x = np.mgrid[:size, :size]
    patterns = [x * 8, y * 8, (x + y) * 4, ((x // 4 + y // 4) % 2) * 255, np.full_like(x, 30),
                (x * y) % 256]
    frames = [np.stack([patterns[i % 6], patterns[(i + 2) % 6], patterns[(i + 4) % 6]], axis=-1)
              for i in range(count)]
    return np.stack(frames).astype(np.uint8)


def test_temporal_consistency_is_the_mean_cosine_of_consecutive_frames(tiny):
    params, clip = tiny
    reward = load_reward("temporal_consistency", params)
    unrelated = _unrelated_frames(5)
    steady = np.repeat(unrelated[:1], 5, axis=0)
    clips = Media.from_videos(np.stack([steady, unrelated]), fps=16)
    rewards, info = compute_reward("temporal_consistency", reward, clips, PROMPTS, METADATA)
    assert rewards.shape == (2,) and rewards.dtype == np.float32
    assert np.all((-1 <= rewards) & (rewards <= 1))
    assert sorted(info) == ["frame_similarity_min", "temporal_consistency"] and len(info["frame_similarity_min"]) == 2
    assert rewards[0] == pytest.approx(1.0, abs=1e-5)  # a clip of one frame repeated: every cosine is 1
    assert rewards[1] < rewards[0] - 0.01
    # by hand: the CLIP's own image features of the processed frames, cosines of neighbours
    pixels = reward.processor(images=list(unrelated), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = clip.get_image_features(pixel_values=pixels)
    embeds = torch.nn.functional.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)
    expected = (embeds[:-1] * embeds[1:]).sum(dim=-1)
    assert rewards[1] == pytest.approx(expected.mean().item(), abs=1e-5)
    assert info["frame_similarity_min"][1] == pytest.approx(expected.min().item(), abs=1e-5)


def test_temporal_consistency_batches_and_refuses_what_it_cannot_score(tiny):
    params, _ = tiny
    frames = np.stack([_unrelated_frames(4), _unrelated_frames(5)[1:], _unrelated_frames(4)[::-1]])
    whole, _ = load_reward("temporal_consistency", params)(frames, ["a"] * 3, [{}] * 3)
    batched, _ = load_reward("temporal_consistency", {**params, "batch_size": 5})(frames, ["a"] * 3, [{}] * 3)
    np.testing.assert_allclose(batched, whole, atol=1e-5)  # batches of 5 cut across clips
    reward = load_reward("temporal_consistency", params)
    one_frame = r"^reward 'temporal_consistency': a clip of 1 frame .*; set sample.num_frames >= 2$"
    with pytest.raises(RewardError, match=one_frame):
        compute_reward("temporal_consistency", reward, Media.from_videos(frames[:, :1], fps=16), ["a"] * 3, [{}] * 3)
    with pytest.raises(RewardError, match="^reward 'temporal_consistency' scores videos, and the model makes images"):
        compute_reward("temporal_consistency", reward, Media.from_images(frames[:, 0]), ["a"] * 3, [{}] * 3)
    with pytest.raises(RewardError, match="^reward.params.clip_model: no such file or folder '/no/such/clip'$"):
        load_reward("temporal_consistency", {**params, "clip_model": "/no/such/clip"})
    with pytest.raises(RewardError, match="^reward.params: 'temporal_consistency' does not take these params"):
        check_reward("temporal_consistency", {"clip": "x"})
