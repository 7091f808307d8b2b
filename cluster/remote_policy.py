"""The sampler, the learner group's ranks and the colocated workers as Ray actors (see
`cluster.remote`)."""

from __future__ import annotations

import shutil
import socket
import tempfile

import numpy as np
import ray
import torch

from actors.sampler import Sampler
from actors.usage import FlopMeter, peak_flops
from actors.worker import ColocatedWorker
from cluster.remote import actor_metrics, keep_init_error
from ddpo.config import Config
from ddpo.trajectory import EpochTrajectories
from learner import Learner


def _meter(actor) -> None:
    """Count the actor's denoiser FLOPs, for the MFU (`actors.usage`)."""
    actor.flop_meter = FlopMeter(actor.model.denoiser)
    actor.peak_flops = peak_flops(actor.model.device, actor.model.denoiser.dtype)


@keep_init_error
class SamplerActor(Sampler):
    def __init__(self, config: Config, num_threads: int):
        torch.set_num_threads(num_threads)
        super().__init__(config)
        self.metrics = actor_metrics("sampler")
        _meter(self)

    def sample(self, batch_id, prompts, seeds, sde_start: int, policy_version: int, weights_ref: list[ray.ObjectRef]):
        """Sample with the given weights version, loading it in place first if it is new."""
        with self.metrics["sampler"].working():
            if policy_version != self.policy_version:
                self.set_weights(ray.get(weights_ref[0]))
            return super().sample(batch_id, prompts, seeds, sde_start)


class LearnerRank:
    """What a rank of the learner group does in Ray. It takes the trajectories as object refs and
    fetches only the sample batches that hold its samples, straight from the object store, without
    passing through the driver."""

    store_dir = None

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def init_method(self, one_node: bool) -> str:
        """Rank 0 picks the group's rendezvous: a file on this node when every rank is here
        (nothing listens), else a free port on this node's address."""
        if one_node:
            self.store_dir = tempfile.mkdtemp(prefix="ddpo-learners-")
            return f"file://{self.store_dir}/store"
        address = ray.util.get_node_ip_address()
        with socket.socket() as probe:
            probe.bind((address, 0))
            return f"tcp://{address}:{probe.getsockname()[1]}"

    def join_group(self, init_method: str) -> None:
        super().join_group(init_method, ray.util.get_node_ip_address())

    def leave_group(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def train_on(self, epoch: EpochTrajectories, trajectory_refs: list[ray.ObjectRef],
                 rewards: list[np.ndarray]) -> dict:
        epoch.fetch = lambda indices: ray.get([trajectory_refs[i] for i in indices])
        with self.metrics["learner"].working():
            return self.train(epoch, rewards)


@keep_init_error
class LearnerActor(LearnerRank, Learner):
    """Rank `rank` of the learner group, on a device of its own."""

    def __init__(self, config: Config, rank: int, world_size: int, num_threads: int):
        torch.set_num_threads(num_threads)
        super().__init__(config, rank, world_size)
        self.metrics = actor_metrics("learner")
        _meter(self)


@keep_init_error
class WorkerActor(LearnerRank, ColocatedWorker):
    """Rank `rank` of the learner group and sampler `rank`, on one device with one model."""

    def __init__(self, config: Config, rank: int, world_size: int, num_threads: int):
        torch.set_num_threads(num_threads)
        super().__init__(config, rank, world_size)
        self.metrics = actor_metrics("sampler", "learner")
        _meter(self)

    def sample(self, batch_id, prompts, seeds, sde_start: int, policy_version: int, weights_ref: list[ray.ObjectRef]):
        """Sample with the rank's own weights, which are the version asked for: the driver asks
        for the version the group holds, and this actor runs its calls in order."""
        if policy_version != self.policy_version:
            raise RuntimeError(f"{self.metrics['sampler'].tags['actor']} holds policy version {self.policy_version}, "
                               f"asked to sample with version {policy_version}")
        with self.metrics["sampler"].working():
            return super().sample(batch_id, prompts, seeds, sde_start)
