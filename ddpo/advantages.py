"""Advantages: rewards normalised per prompt, then clipped. Per prompt over a running buffer
(DDPO, Sec. 5 "per-prompt stat tracking"), or within the epoch's group of samples of the prompt
(GRPO, as Flow-GRPO)."""

from __future__ import annotations

from collections import deque

import numpy as np


class PerPromptStatTracker:
    """A_i = (r_i - mean_c) / (std_c + 1e-6), with mean_c, std_c over a running buffer of the
    last `buffer_size` rewards of prompt c; until the buffer holds `min_count` rewards, the
    statistics of the whole batch are used instead."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        prompts_arr = np.asarray(prompts, dtype=object)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):  # unique, in order
            mask = prompts_arr == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            stats = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
            advantages[mask] = (rewards[mask] - stats.mean()) / (stats.std() + 1e-6)
        return advantages

    def state_dict(self) -> dict[str, list[float]]:
        return {prompt: list(buffer) for prompt, buffer in self.buffers.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """A_i = (r_i - mean) / (std + 1e-6) over the batch (no per-prompt tracking)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-6)


def group_advantages(prompts: list[str], rewards: np.ndarray, global_std: bool = False) -> np.ndarray:
    """GRPO: A_i = (r_i - mean_G) / (std_G + 1e-6), where G is the group of this update's samples
    of prompt c_i (the epoch plan samples each prompt `group_size` times); with `global_std`,
    std_G is replaced by the std of all the update's rewards."""
    rewards = np.asarray(rewards, dtype=np.float64)
    prompts_arr = np.asarray(prompts, dtype=object)
    advantages = np.empty_like(rewards)
    for prompt in dict.fromkeys(prompts):
        mask = prompts_arr == prompt
        std = rewards.std() if global_std else rewards[mask].std()
        advantages[mask] = (rewards[mask] - rewards[mask].mean()) / (std + 1e-6)
    return advantages


def clip_advantages(advantages: np.ndarray, adv_clip_max: float) -> np.ndarray:
    return np.clip(advantages, -adv_clip_max, adv_clip_max)
