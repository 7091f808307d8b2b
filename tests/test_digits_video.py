"""The reward of clips of a moving digit (`digit_motion`), on held-out digits moved by hand."""

import numpy as np
import pytest

from ddpo.media import Media
from rewards import RewardError, compute_reward, load_reward, reward_medium
from rewards.digits import DIGIT_WORDS, DIRECTIONS, digit_clips, load_heldout, prompted_direction

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@pytest.fixture(scope="module")
def reward():
    return load_reward("digit_motion")


@pytest.fixture(scope="module")
def clips():
    """40 held-out digits (never trained on), 10 moving each way at 1 or 2 pixels a frame."""
    pixels, labels = load_heldout()
    rng = np.random.default_rng(0)
    directions = [direction for direction in DIRECTIONS for _ in range(10)]
    frames = digit_clips(pixels[:40], directions, rng.integers(1, 3, 40), 5, 16, rng)
    return frames, labels[:40], directions


def prompts_of(labels, directions):
    return [f"the digit {DIGIT_WORDS[d]} sliding {direction}" for d, direction in zip(labels, directions)]


def test_the_reward_scores_the_prompted_motion_above_the_wrong_one_and_a_blank_clip(reward, clips):
    frames, labels, directions = clips
    assert reward_medium(reward) == "video"
    assert frames.shape == (40, 5, 16, 16, 3) and frames.dtype == np.uint8
    metadata = [{}] * len(frames)
    right, info = compute_reward("digit_motion", reward, Media.from_videos(frames, fps=16),
                                 prompts_of(labels, directions), metadata)
    wrong, wrong_info = reward(frames, prompts_of(labels, [OPPOSITE[d] for d in directions]), metadata)
    blank, blank_info = reward(np.full_like(frames, 255), prompts_of(labels, directions), metadata)
    still, _ = reward(np.repeat(frames[:, :1], 5, axis=1), prompts_of(labels, directions), metadata)
    assert right.mean() > 0.8 and np.mean(info["correct"]) >= 0.9  # the judge's own errors aside
    assert info["motion_correct"] == [1.0] * 40 and all(a.endswith(d) for a, d in zip(info["answer"], directions))
    assert np.all(right >= wrong) and wrong.max() == 0 and wrong_info["correct"] == [0.0] * 40
    assert blank.max() == 0 and blank_info["correct"] == [0.0] * 40 and set(blank_info["answer"]) == {"none still"}
    assert still.max() == 0  # a well-drawn digit that does not move
    # the same digit moving the right way, one pixel a frame less far: still right
    short = np.concatenate([frames[:, :3], np.repeat(frames[:, 2:3], 2, axis=1)], axis=1)
    _, short_info = reward(short, prompts_of(labels, directions), metadata)
    assert np.mean(short_info["motion_correct"]) > 0.4


def test_a_prompt_without_one_direction_is_a_one_line_error(reward, clips):
    frames = clips[0][:1]
    for prompt, named in [("the digit four", "no direction"), ("the digit four going up and left", "several directions")]:
        with pytest.raises(RewardError, match=rf"^reward 'digit_motion': the prompt '{prompt}' names {named} "
                                              r"\(left, right, up or down\)$"):
            reward(frames, [prompt], [{}])
    assert prompted_direction("a handwritten 4 moving Left") == "left"
