"""The plain classes as Ray actors: the same methods, plus their busy time as metrics, plus
what only makes sense inside Ray (object refs in, torch threads from the actor's num_cpus)."""

from __future__ import annotations

import os
import sys

import numpy as np
import ray
import torch

from actors.reward import RewardWorker
from actors.sampler import Sampler
from cluster.metrics import ActorMetrics
from ddpo.config import Config, RewardConfig
from learner import Learner
from rewards import RewardProcessDead


def _actor_metrics(role: str) -> ActorMetrics:
    return ActorMetrics(ray.get_runtime_context().get_actor_name() or role, role)


def keep_init_error(cls):
    """Ray keeps only the text of an error raised in an actor's constructor (a missing model,
    say), so the run would end in a traceback. The constructor keeps the error instead, and
    `ready()`, the driver's first call, raises it whole: the user gets its one line."""
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        self.init_error = None
        try:
            init(self, *args, **kwargs)
        except Exception as err:
            self.init_error = err

    def ready(self) -> None:
        if self.init_error is not None:
            raise self.init_error

    cls.__init__, cls.ready = __init__, ready
    return cls


@keep_init_error
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


@keep_init_error
class RewardActor(RewardWorker):
    def __init__(self, reward: RewardConfig, num_threads: int):
        torch.set_num_threads(num_threads)
        super().__init__(reward)
        self.metrics = _actor_metrics("reward")

    def score(self, *batches):
        with self.metrics.working():
            try:
                return super().score(*batches)
            except RewardProcessDead as err:
                print(f"reward actor exits to be restarted: {err}", file=sys.stderr, flush=True)
                os._exit(1)  # Ray restarts the actor (max_restarts) and reruns this call on it


@keep_init_error
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
