"""The plain classes as Ray actors: the same methods, plus their busy time as metrics, plus
what only makes sense inside Ray (object refs in, torch threads from the actor's num_cpus)."""

from __future__ import annotations

import numpy as np
import ray
import torch

from actors.reward import RewardWorker
from actors.sampler import Sampler
from cluster.metrics import ActorMetrics
from ddpo.config import Config
from learner import Learner


def _actor_metrics(role: str) -> ActorMetrics:
    return ActorMetrics(ray.get_runtime_context().get_actor_name() or role, role)


class SamplerActor(Sampler):
    def __init__(self, config: Config, num_threads: int):
        torch.set_num_threads(num_threads)
        super().__init__(config)
        self.metrics = _actor_metrics("sampler")

    def sample(self, batch_id, prompts, seeds, policy_version: int, weights_ref: list[ray.ObjectRef]):
        """Sample with the given weights version, loading it in place first if it is new."""
        with self.metrics.working():
            if policy_version != self.policy_version:
                self.set_weights(ray.get(weights_ref[0]))
            return super().sample(batch_id, prompts, seeds)


class RewardActor(RewardWorker):
    def __init__(self, reward_name: str):
        super().__init__(reward_name)
        self.metrics = _actor_metrics("reward")

    def score(self, batch):
        with self.metrics.working():
            return super().score(batch)


class LearnerActor(Learner):
    """Takes the trajectories as object refs, so that they move from the samplers' object store
    to the learner without passing through the driver."""

    def __init__(self, config: Config, num_threads: int):
        torch.set_num_threads(num_threads)
        super().__init__(config)
        self.metrics = _actor_metrics("learner")

    def train_on(self, trajectory_refs: list[ray.ObjectRef], rewards: list[np.ndarray]) -> dict:
        batches = ray.get(trajectory_refs)
        with self.metrics.working():
            return self.train(batches, rewards)
