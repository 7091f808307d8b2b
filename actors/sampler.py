"""The sampler: a diffusers pipeline (behind its family adapter) with the LoRA adapter,
producing trajectories as Arrow.

A plain class; the driver runs it as the Ray actors `sampler-<i>` of devices that only sample
(the separate layout). A device that samples and trains holds one model for both
(`actors.worker.ColocatedWorker`), which samples through the same `sample_batch`.
"""

from __future__ import annotations

import pyarrow as pa

from ddpo.config import Config
from ddpo.rollout import sample_trajectories
from ddpo.families import ModelFamily
from ddpo.lora import LoraState, get_lora_state, load_lora_state
from ddpo.pipeline import load_policy
from ddpo.plan import sde_steps
from ddpo.trajectory import LATENTS, to_record_batch


def sample_batch(model: ModelFamily, config: Config, batch_id: str, prompts: list[str], seeds: list[int],
                 sde_start: int, policy_version: int) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    """One sample batch with the model's active weights (its SDE window, if any, from step
    `sde_start`): (the full trajectories, the same rows without latents). The reward pool and the
    driver only need the second; the learner needs the first."""
    trajectories = sample_trajectories(model, prompts, seeds, config.sample, sde_steps(config, sde_start))
    batch = to_record_batch(trajectories, batch_id, policy_version)
    return batch, batch.drop_columns([LATENTS])


class Sampler:
    def __init__(self, config: Config):
        self.config = config
        self.model = load_policy(config)
        self.policy_version = -1  # no weights from the learner yet

    def set_weights(self, weights: tuple[int, LoraState]) -> None:
        """Load a broadcast LoRA version in place (a version already held is not reloaded)."""
        version, state = weights
        if version != self.policy_version:
            load_lora_state(self.model.denoiser, state)
            self.policy_version = version

    def weights(self) -> tuple[int, LoraState]:
        return self.policy_version, get_lora_state(self.model.denoiser)

    def sample(self, batch_id: str, prompts: list[str], seeds: list[int],
               sde_start: int = 0) -> tuple[pa.RecordBatch, pa.RecordBatch]:
        """One sample batch with the weights last set (`sample_batch`)."""
        if self.policy_version < 0:
            raise RuntimeError("sampler has no policy weights yet: call set_weights first")
        return sample_batch(self.model, self.config, batch_id, prompts, seeds, sde_start, self.policy_version)
