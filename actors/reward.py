"""The reward worker: scores a sample batch's images with a reward function.

A plain class; the driver runs M of them as Ray actors named `reward-<i>` behind
`ray.util.ActorPool`, so each batch goes to whichever worker is free.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ddpo.trajectory import images_of
from rewards import compute_reward, load_reward


class RewardWorker:
    def __init__(self, reward_name: str):
        self.name = reward_name
        self.fn = load_reward(reward_name)

    def score(self, batch: pa.RecordBatch) -> tuple[str, np.ndarray, dict[str, list]]:
        """(batch_id, rewards [B], info) for one sample batch (rows without latents)."""
        prompts = batch.column("prompt").to_pylist()
        metadata = batch.select(["batch_id", "seed", "policy_version"]).to_pylist()
        rewards, info = compute_reward(self.name, self.fn, images_of(batch), prompts, metadata)
        return batch.column("batch_id")[0].as_py(), rewards, info
