"""A device that samples and trains: the sampler and learner rank `rank` in one process, on one
pipeline and one LoRA (the colocated layout, `worker-<rank>` in Ray).

A separate sampler holds a second copy of the model and loads each broadcast LoRA version into
it; here the sampler side reads the rank's weights in place, so a device holds the model once
and nothing is broadcast within it. It samples with the policy a separate sampler would be sent
(`Learner.weights`): the trained adapter, or DiffusionNFT's old policy.
"""

from __future__ import annotations

import pyarrow as pa

from actors.sampler import sample_batch
from ddpo.lora import active_adapter
from learner import Learner
from learner.learner import OLD


class ColocatedWorker(Learner):
    def sample(self, batch_id: str, prompts: list[str], seeds: list[int],
               sde_start: int = 0) -> tuple[pa.RecordBatch, pa.RecordBatch]:
        """One sample batch with the current `policy_version`'s sampling policy (`sample_batch`)."""
        with active_adapter(self.model.denoiser, OLD if self.old_policy is not None else "default"):
            return sample_batch(self.model, self.config, batch_id, prompts, seeds, sde_start, self.policy_version)
