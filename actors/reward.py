"""The reward worker: scores sample batches with the configured reward (one reward, or a
weighted sum of several).

A plain class; the driver runs M of them as Ray actors named `reward-<i>` behind its reward
pool, which hands a free worker every batch that is waiting, from any sampler, in one call.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ddpo.config import RewardConfig
from ddpo.trajectory import images_of
from rewards import compute_reward, load_reward

Scored = tuple[str, np.ndarray, dict[str, list]]  # (batch_id, rewards [B], info)


class RewardWorker:
    def __init__(self, reward: RewardConfig):
        self.terms = [(t.name, t.weight, load_reward(t.name, t.params)) for t in reward.terms()]

    def score(self, *batches: pa.RecordBatch) -> list[Scored]:
        """(batch_id, rewards, info) for each sample batch (rows without latents). Several
        batches are scored as one: a model reward sees one large batch."""
        table = pa.Table.from_batches(batches)
        images, prompts = images_of(table), table.column("prompt").to_pylist()
        metadata = table.select(["batch_id", "seed", "policy_version"]).to_pylist()
        total, info = np.zeros(len(images), np.float32), {}
        for name, weight, fn in self.terms:
            rewards, term_info = compute_reward(name, fn, images, prompts, metadata)
            total += weight * rewards  # r = sum_i w_i r_i
            if len(self.terms) == 1:
                info = term_info
            else:  # each term's reward and extras, under its name
                info[name] = rewards.tolist()
                info.update({f"{name}.{key}": values for key, values in term_info.items()})
        scored, start = [], 0
        for batch in batches:
            stop = start + batch.num_rows
            scored.append((batch.column("batch_id")[0].as_py(), total[start:stop],
                           {key: values[start:stop] for key, values in info.items()}))
            start = stop
        return scored
