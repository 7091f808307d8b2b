"""Advantages: rewards normalised per prompt, then clipped (DDPO, Sec. 5 "per-prompt stat tracking")."""

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


def clip_advantages(advantages: np.ndarray, adv_clip_max: float) -> np.ndarray:
    return np.clip(advantages, -adv_clip_max, adv_clip_max)
