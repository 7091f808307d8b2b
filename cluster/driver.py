"""The DDPO driver on Ray: sample -> reward -> train -> broadcast, one epoch at a time.

    samplers (sampler-<i>) --Arrow trajectories--> reward pool (reward-<j>) --rewards--> learner
        ^                                                                                  |
        +-------------------- one ObjectRef per LoRA version (policy_version) -------------+

With `cluster.max_policy_lag = k`, sampling runs up to k epochs ahead of the learner, with the
newest weights the learner has put; batches more than k versions old are dropped and counted.
k = 0 is the paper's synchronous algorithm.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from tqdm.auto import tqdm

from cluster import QUIET_ENV
from cluster.metrics import DriverMetrics
from cluster.placement import Placement
from cluster.remote import LearnerActor, RewardActor, SamplerActor
from cluster.reward_pool import RewardPool
from cluster.run_dir import RunRecorder, is_checkpoint_epoch, latest_checkpoint, with_rewards
from ddpo.config import ActorResources, Config
from ddpo.plan import SampleBatchSpec, epoch_plan, eval_plan, fresh_batches


class ActorLost(RuntimeError):
    """An actor died for good (the learner, or a sampler or reward actor out of restarts)."""


@dataclass
class SampleTask:
    spec: SampleBatchSpec
    trajectory_ref: ray.ObjectRef  # the full trajectories (with latents), for the learner
    summary_ref: ray.ObjectRef  # the same rows without latents, for rewards and the run dir


def _restartable(max_restarts: int) -> dict:
    """A restartable actor also reruns the tasks it had in flight (at least once: batch ids
    keep a rerun from counting twice)."""
    return {"max_restarts": max_restarts, "max_task_retries": -1 if max_restarts else 0}


def _threads(resources: ActorResources) -> int:
    return max(1, int(resources.num_cpus))


class Driver:
    def __init__(self, config: Config, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        self.prompts = config.load_prompts()
        c = config.cluster
        self.placement = Placement(config)
        quiet = {"runtime_env": {"env_vars": QUIET_ENV}}
        self.policy_version = 0
        self.weights: tuple[int, list[ray.ObjectRef]] | None = None  # set by broadcast()
        self.metrics = DriverMetrics()
        self.recorder = RunRecorder(run_dir)
        # set on Ctrl-C (by `ddpo train`): fit() returns after the epoch under way
        self.stop_requested = threading.Event()
        self.learner, self.samplers, self.reward_actors = None, [], []
        try:
            self.reward_actors = [
                ray.remote(RewardActor).options(
                    **self.placement.options(f"reward-{i}"), **quiet, **_restartable(c.max_restarts)
                ).remote(config.reward, _threads(c.reward))
                for i in range(c.num_reward_actors)
            ]
            if c.reward.num_gpus > 0:  # a vLLM engine sizes its cache from the GPU memory free at
                self._wait_ready(self.reward_actors)  # its start: start it before the diffusers actors
            self.learner = ray.remote(LearnerActor).options(**self.placement.options("learner"), **quiet).remote(
                config, _threads(c.learner)
            )
            self.samplers = [
                ray.remote(SamplerActor).options(
                    **self.placement.options(f"sampler-{i}"), **quiet, **_restartable(c.max_restarts)
                ).remote(config, _threads(c.sampler))
                for i in range(c.num_samplers)
            ]
            self._wait_ready(self.actors)
        except Exception:
            self.shutdown()
            raise
        self.reward_pool = RewardPool(self.reward_actors, " + ".join(t.name for t in config.reward.terms()),
                                      config.reward.max_batch_images, config.reward.timeout_s)

    @property
    def actors(self) -> list:
        return [a for a in [self.learner, *self.samplers, *self.reward_actors] if a is not None]

    @staticmethod
    def _wait_ready(actors: list) -> None:
        """The actors load their models in their constructors: wait for them, so that an error
        there surfaces now, whole, and no reward timeout counts a model load."""
        ray.get([actor.ready.remote() for actor in actors])

    def shutdown(self) -> None:
        self.recorder.close()
        for actor in self.actors:
            ray.kill(actor)
        self.placement.remove()

    def lost_actor_message(self, err: ray.exceptions.RayActorError) -> str:
        """One line: which actor died, and where the run can go on from."""
        actors = {"learner": self.learner,
                  **{f"sampler-{i}": a for i, a in enumerate(self.samplers)},
                  **{f"reward-{i}": a for i, a in enumerate(self.reward_actors)}}
        name = next((n for n, a in actors.items() if a._actor_id.hex() == getattr(err, "actor_id", None)), "an actor")
        checkpoint = latest_checkpoint(self.run_dir)
        where = (f"go on from {checkpoint} with: ddpo train --resume {self.run_dir}" if checkpoint
                 else "no checkpoint was written yet (see checkpoint_every)")
        return f"the actor '{name}' died and was not restarted; {where}"

    # -- stages -------------------------------------------------------------------------------

    def broadcast(self) -> None:
        """Put the learner's LoRA into the object store once. Every sample task from now on
        carries the one ref; a sampler loads it in place before its next batch. Because each
        task carries its weights, a task Ray retries on a restarted sampler has them too."""
        weights_ref = self.learner.weights.remote()
        ray.wait([weights_ref], fetch_local=False)
        self.weights = (self.policy_version, [weights_ref])  # in a list: resolved only on a new version

    def submit_sampling(self, epoch: int) -> list[SampleTask]:
        tasks = []
        for i, spec in enumerate(epoch_plan(self.config, self.prompts, epoch)):
            sampler = self.samplers[i % len(self.samplers)]
            trajectory_ref, summary_ref = sampler.sample.options(num_returns=2).remote(
                spec.batch_id, spec.prompts, spec.seeds, *self.weights
            )
            tasks.append(SampleTask(spec, trajectory_ref, summary_ref))
        return tasks

    def collect(self, tasks: list[SampleTask], progress: tqdm) -> tuple[dict, float, float]:
        """Wait for an epoch's sample batches, queueing each for the reward pool as soon as it is
        made. Returns ({batch_id: (rewards, info)}, sample seconds, reward seconds after that)."""
        start = time.perf_counter()
        waiting = {task.summary_ref: len(task.spec.prompts) for task in tasks}
        scored: dict[str, tuple[np.ndarray, dict]] = {}
        sampled_at = start
        while len(scored) < len(tasks):
            if waiting:
                ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
                for ref in ready:
                    self.reward_pool.submit(ref, waiting.pop(ref))
                if not waiting:
                    sampled_at = time.perf_counter()
            for batch_id, rewards, info in self.reward_pool.poll(wake_on=list(waiting)):
                if batch_id not in scored:  # a batch id counts once
                    scored[batch_id] = (rewards, info)
                    progress.update(len(rewards))
            self.metrics.queues(sampling=len(waiting), scoring=self.reward_pool.num_items)
        return scored, sampled_at - start, time.perf_counter() - sampled_at

    def evaluate(self, when: str) -> None:
        """Sample and score the fixed eval batch with the current weights, and record it."""
        spec = eval_plan(self.config, self.prompts)
        _, summary_ref = self.samplers[0].sample.options(num_returns=2).remote(
            spec.batch_id, spec.prompts, spec.seeds, *self.weights)
        ((_, rewards, info),) = ray.get(self.reward_actors[0].score.remote(summary_ref))
        table = with_rewards(pa.Table.from_batches([ray.get(summary_ref)]), rewards, info)
        self.recorder.record_eval(when, self.policy_version, table)

    # -- the loop -----------------------------------------------------------------------------

    def resume(self, checkpoint: Path) -> int:
        """Load a checkpoint into the learner; returns the epoch to go on from."""
        self.policy_version = ray.get(self.learner.load_checkpoint.remote(checkpoint))
        return self.policy_version

    def save_checkpoint(self) -> Path | None:
        return ray.get(self.learner.save_checkpoint.remote(self.run_dir / "checkpoints"))

    def fit(self, start_epoch: int = 0) -> list[dict]:
        config = self.config
        max_lag = config.cluster.max_policy_lag
        self.broadcast()
        if start_epoch == 0 and config.eval_images:
            self.evaluate("before")
        in_flight: deque[list[SampleTask]] = deque()
        next_epoch = start_epoch
        history = []
        epochs = tqdm(range(start_epoch, config.num_epochs), desc="epochs", unit="epoch",
                      initial=start_epoch, total=config.num_epochs)
        for epoch in epochs:
            epoch_start = time.perf_counter()
            # keep sampling up to max_lag epochs ahead of the learner
            while next_epoch < config.num_epochs and next_epoch <= epoch + max_lag:
                in_flight.append(self.submit_sampling(next_epoch))
                next_epoch += 1
            tasks = in_flight.popleft()
            with tqdm(total=config.samples_per_epoch, desc=f"epoch {epoch} sample+reward",
                      unit="img", leave=False) as progress:
                scored, time_sample, time_reward = self.collect(tasks, progress)
            summaries = ray.get([task.summary_ref for task in tasks])

            # drop batches made with weights more than max_lag versions old
            fresh = fresh_batches([s.column("policy_version")[0].as_py() for s in summaries],
                                  self.policy_version, max_lag)
            train_start = time.perf_counter()
            learner_metrics = ray.get(self.learner.train_on.remote(
                [tasks[i].trajectory_ref for i in fresh],
                [scored[tasks[i].spec.batch_id][0] for i in fresh],
            ))
            time_train = time.perf_counter() - train_start
            self.policy_version = learner_metrics.pop("policy_version")

            broadcast_start = time.perf_counter()
            self.broadcast()
            time_broadcast = time.perf_counter() - broadcast_start
            time_epoch = time.perf_counter() - epoch_start

            # the checkpoint first: a metrics line never runs ahead of the checkpoint it is due
            if is_checkpoint_epoch(config, epoch):
                self.save_checkpoint()
            trajectories = ray.get([task.trajectory_ref for task in tasks]) if config.save_latents else summaries
            metrics = self.recorder.record_epoch(
                epoch, self.policy_version,
                table=pa.Table.from_batches(trajectories),
                scored=[scored[task.spec.batch_id] for task in tasks],
                learner_metrics=learner_metrics,
                dropped_stale=len(tasks) - len(fresh),
                timings={"time_sample_s": time_sample, "time_reward_s": time_reward,
                         "time_train_s": time_train, "time_broadcast_s": time_broadcast,
                         "time_epoch_s": time_epoch},
            )
            self.metrics.epoch(metrics)
            epochs.set_postfix(reward=f"{metrics['reward_mean']:.4f}", kl=f"{metrics['approx_kl'] or 0:.1e}")
            history.append(metrics)
            if self.stop_requested.is_set():
                return history
        if config.eval_images:
            self.evaluate("after")
        return history
