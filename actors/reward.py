"""The reward worker: scores sample batches with the configured reward (one reward, or a
weighted sum of several).

A plain class; the driver runs M of them as Ray actors named `reward-<i>` behind its reward
pool, which hands a free worker every batch that is waiting, from any sampler, in one call.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ddpo.config import RewardConfig
from ddpo.trajectory import media_of
from rewards import compute_reward, load_reward

Scored = tuple[str, np.ndarray, dict[str, list]]  # (batch_id, rewards [B], info)


class RewardWorker:
    def __init__(self, reward: RewardConfig):
        # the trained reward, and the held-out one (`reward.heldout`, the guard's; may be empty)
        self.terms = {"trained": [(t.name, t.weight, load_reward(t.name, t.params)) for t in reward.terms()],
                      "heldout": [(t.name, t.weight, load_reward(t.name, t.params)) for t in reward.heldout]}
        self.frame_reduction = reward.frame_reduction  # an image reward on clips: their frames' mean or min

    def score(self, *batches: pa.RecordBatch, prompt_metadata: dict[str, dict] | None = None,
              heldout: bool = False) -> list[Scored]:
        """(batch_id, rewards, info) for each sample batch (rows without latents), by the trained
        reward or the held-out one. Several batches are scored as one: a model reward sees one
        large batch. A row's metadata is its prompt's (`prompt_metadata`: the prompts file's
        JSON Lines fields) with its batch id, seed and policy version."""
        terms = self.terms["heldout" if heldout else "trained"]
        table = pa.Table.from_batches(batches)
        media, prompts = media_of(table), table.column("prompt").to_pylist()
        rows = table.select(["batch_id", "seed", "policy_version"]).to_pylist()
        metadata = [{**(prompt_metadata or {}).get(prompt, {}), **row} for prompt, row in zip(prompts, rows)]
        total, info = np.zeros(len(media), np.float32), {}
        for name, weight, fn in terms:
            rewards, term_info = compute_reward(name, fn, media, prompts, metadata, self.frame_reduction)
            total += weight * rewards  # r = sum_i w_i r_i
            if len(terms) == 1:
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
