"""The DDPO driver on Ray: sample -> reward -> train -> broadcast, one epoch at a time.

    samplers (sampler-<i>) --Arrow trajectories--> reward pool (reward-<j>) --rewards--> learners
        ^                                                                    (learner-<r>, one group)
        +-------------------- one ObjectRef per LoRA version (policy_version) -------------+

With `cluster.max_policy_lag = k`, sampling runs up to k epochs ahead of the learner, with the
newest weights the learner has put; batches more than k versions old are dropped and counted.
k = 0 is the paper's synchronous algorithm.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from tqdm.auto import tqdm

from cluster import ACTOR_ENV
from cluster.metrics import ROLES, DriverMetrics, install_grafana_dashboard
from cluster.placement import Placement, resolve_layout
from cluster.remote import CONCURRENCY_GROUPS, RewardActor
from cluster.remote_policy import LearnerActor, SamplerActor
from cluster.reward_pool import RewardPool
from cluster.run_dir import RunRecorder, is_checkpoint_epoch, latest_checkpoint, with_rewards
from ddpo.config import Config
from ddpo.plan import SampleBatchSpec, epoch_plan, eval_plan, fresh_batches
from ddpo.trajectory import EpochTrajectories


class ActorLost(RuntimeError):
    """An actor died for good (the learner, or a sampler or reward actor out of restarts)."""


@dataclass
class SampleTask:
    spec: SampleBatchSpec
    trajectory_ref: ray.ObjectRef  # the full trajectories (with latents), for the learner
    summary_ref: ray.ObjectRef  # the same rows without latents, for rewards and the run dir


def restart_options(max_restarts: int) -> dict:
    """A restartable actor also reruns the tasks it had in flight (at least once: batch ids
    keep a rerun from counting twice)."""
    return {"max_restarts": max_restarts, "max_task_retries": -1 if max_restarts else 0}


def get_all(refs: list[ray.ObjectRef], grace_s: float = 10.0) -> list:
    """ray.get of all refs, raising the first failure at once: a learner rank that died leaves
    the others blocked in a collective, which must not keep the driver waiting. When a rank's
    collective failed, a peer most likely died: that death is what gets raised, if it shows
    within `grace_s`."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ready)
        except ray.exceptions.RayTaskError:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=grace_s)
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    raise
                except ray.exceptions.RayTaskError:
                    pass
            raise
    return ray.get(list(refs))


class Driver:
    def __init__(self, config: Config, run_dir: Path):
        config = resolve_layout(config, ray.cluster_resources())
        self.config = config
        self.run_dir = run_dir
        self.prompts = config.load_prompts()
        c = config.cluster
        self.placement = Placement(config)
        self.policy_version = 0
        self.weights: tuple[int, list[ray.ObjectRef]] | None = None  # set by broadcast()
        self.metrics = DriverMetrics()
        self.grafana_dashboard = self._install_grafana_dashboard()
        self.recorder = RunRecorder(run_dir)
        # set on Ctrl-C (by `ddpo train`): fit() returns after the epoch under way
        self.stop_requested = threading.Event()
        self.learners, self.samplers, self.reward_actors = [], [], []
        try:
            self.reward_actors = [self._start(RewardActor, f"reward-{i}", config.reward, restartable=True)
                                  for i in range(c.num_reward_actors)]
            if c.reward.num_gpus > 0:  # a vLLM engine sizes its cache from the GPU memory free at
                self._wait_ready(self.reward_actors)  # its start: start it before the diffusers actors
            self.learners = [self._start(LearnerActor, f"learner-{rank}", config, rank, c.num_learners)
                             for rank in range(c.num_learners)]
            self.samplers = [self._start(SamplerActor, f"sampler-{i}", config, restartable=True)
                             for i in range(c.num_samplers)]
            self._wait_ready(self.actors)
            self._join_learner_group()
        except Exception:
            self.shutdown()
            raise
        self.reward_pool = RewardPool(self.reward_actors, config.reward.label,
                                      config.reward.max_batch_images, config.reward.timeout_s)
        self.busy_seconds = dict.fromkeys(self.named_actors, 0.0)  # per actor, at the last epoch's end

    @staticmethod
    def _install_grafana_dashboard() -> Path | None:
        """The DDPO dashboard beside Ray's own, for Grafana started with Ray's generated config
        (on the head node; None elsewhere). A monitoring aid: a failure to write it is reported,
        and the run goes on."""
        context = ray.get_runtime_context()
        try:
            return install_grafana_dashboard(Path(context.get_temp_dir()) / context.get_session_name())
        except OSError as err:
            print(f"the Grafana dashboard was not installed: {err}", file=sys.stderr)
            return None

    def _start(self, cls, name: str, *args, restartable: bool = False):
        """The actor `name` of class `cls`, in its bundle, with its torch threads."""
        options = {**self.placement.options(name), "runtime_env": {"env_vars": ACTOR_ENV},
                   **restart_options(self.config.cluster.max_restarts if restartable else 0)}
        return ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(cls).options(**options).remote(
            *args, self.placement.threads[name])

    def _join_learner_group(self) -> None:
        """Rank 0's rendezvous reaches every rank through the driver; all join together."""
        if len(self.learners) == 1:
            return
        nodes = set(ray.get([learner.node_id.remote() for learner in self.learners]))
        init_method = ray.get(self.learners[0].init_method.remote(one_node=len(nodes) == 1))
        get_all([learner.join_group.remote(init_method) for learner in self.learners])

    @property
    def named_actors(self) -> dict[str, object]:
        return {**{f"learner-{r}": a for r, a in enumerate(self.learners)},
                **{f"sampler-{i}": a for i, a in enumerate(self.samplers)},
                **{f"reward-{i}": a for i, a in enumerate(self.reward_actors)}}

    @property
    def actors(self) -> list:
        return list(self.named_actors.values())

    @staticmethod
    def _wait_ready(actors: list) -> None:
        """The actors load their models in their constructors: wait for them, so that an error
        there surfaces now, whole, and no reward timeout counts a model load."""
        ray.get([actor.ready.remote() for actor in actors])

    def shutdown(self) -> None:
        self.recorder.close()
        if len(self.learners) > 1:  # the group's rendezvous file goes too (a dead rank: no wait)
            ray.wait([learner.leave_group.remote() for learner in self.learners],
                     num_returns=len(self.learners), timeout=5)
        for actor in self.actors:
            ray.kill(actor)
        self.placement.remove()

    def lost_actor_message(self, err: ray.exceptions.RayActorError) -> str:
        """One line: which actor died, and where the run can go on from."""
        name = next((n for n, a in self.named_actors.items()
                     if a._actor_id.hex() == getattr(err, "actor_id", None)), "an actor")
        checkpoint = latest_checkpoint(self.run_dir)
        where = (f"go on from {checkpoint} with: ddpo train --resume {self.run_dir}" if checkpoint
                 else "no checkpoint was written yet (see checkpoint_every)")
        return f"the actor '{name}' died and was not restarted; {where}"

    # -- stages -------------------------------------------------------------------------------

    def broadcast(self) -> None:
        """Put the learner's LoRA into the object store once. Every sample task from now on
        carries the one ref; a sampler loads it in place before its next batch. Because each
        task carries its weights, a task Ray retries on a restarted sampler has them too."""
        weights_ref = self.learners[0].weights.remote()  # every rank holds the same weights
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
        made. Returns ({batch_id: (rewards, info)}, when the last batch was sampled, when the
        last was scored), as `time.perf_counter()` readings."""
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
        return scored, sampled_at, time.perf_counter()

    def evaluate(self, when: str) -> None:
        """Sample and score the fixed eval batch with the current weights, and record it."""
        spec = eval_plan(self.config, self.prompts)
        _, summary_ref = self.samplers[0].sample.options(num_returns=2).remote(
            spec.batch_id, spec.prompts, spec.seeds, *self.weights)
        ((_, rewards, info),) = ray.get(self.reward_actors[0].score.remote(summary_ref))
        table = with_rewards(pa.Table.from_batches([ray.get(summary_ref)]), rewards, info)
        self.recorder.record_eval(when, self.policy_version, table)

    # -- the loop -----------------------------------------------------------------------------

    def train(self, tasks: list[SampleTask], summaries: list[pa.RecordBatch], rewards: list[np.ndarray]) -> dict:
        """One update on every learner rank; each fetches its samples' batches itself."""
        epoch = EpochTrajectories.describe(summaries)
        trajectory_refs = [task.trajectory_ref for task in tasks]
        results = get_all([learner.train_on.remote(epoch, trajectory_refs, rewards) for learner in self.learners])
        return results[0]  # the ranks' diagnostics are summed across the group: all the same

    def resume(self, checkpoint: Path) -> int:
        """Load a checkpoint into every learner rank; returns the epoch to go on from."""
        versions = get_all([learner.load_checkpoint.remote(checkpoint) for learner in self.learners])
        self.policy_version = versions[0]
        return self.policy_version

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes it: every rank holds the same state."""
        return ray.get(self.learners[0].save_checkpoint.remote(self.run_dir / "checkpoints"))

    def busy_fractions(self, seconds: float) -> dict[str, float]:
        """Each role's busy fraction since the last call, over `seconds` of wall time: the
        share of its actors' time spent working (colocated actors share a device)."""
        names = list(self.busy_seconds)
        now = dict(zip(names, ray.get([self.named_actors[n].busy_seconds.remote() for n in names])))
        busy, counts = dict.fromkeys(ROLES, 0.0), dict.fromkeys(ROLES, 0)
        for name in names:  # a restarted actor counts from its restart
            role = name.split("-")[0]
            before = self.busy_seconds[name] if now[name] >= self.busy_seconds[name] else 0.0
            busy[role] += now[name] - before
            counts[role] += 1
        self.busy_seconds = now
        return {role: busy[role] / (counts[role] * seconds) for role in ROLES}

    def fit(self, start_epoch: int = 0) -> list[dict]:
        config = self.config
        max_lag = config.cluster.max_policy_lag
        self.broadcast()
        if start_epoch == 0 and config.eval_images:
            self.evaluate("before")
        in_flight: deque[list[SampleTask]] = deque()
        next_epoch = start_epoch

        def sample_up_to(last_epoch: int) -> None:
            nonlocal next_epoch
            while next_epoch < config.num_epochs and next_epoch <= last_epoch:
                in_flight.append(self.submit_sampling(next_epoch))
                next_epoch += 1

        history = []
        epochs = tqdm(range(start_epoch, config.num_epochs), desc="epochs", unit="epoch",
                      initial=start_epoch, total=config.num_epochs)
        sample_up_to(start_epoch + max_lag)  # sampling runs up to max_lag epochs ahead of the learner
        epoch_start = time.perf_counter()
        for epoch in epochs:
            tasks = in_flight.popleft()
            with tqdm(total=config.samples_per_epoch, desc=f"epoch {epoch} sample+reward",
                      unit="img", leave=False) as progress:
                scored, sampled_at, scored_at = self.collect(tasks, progress)
            summaries = ray.get([task.summary_ref for task in tasks])

            # drop batches made with weights more than max_lag versions old
            fresh = fresh_batches([s.column("policy_version")[0].as_py() for s in summaries],
                                  self.policy_version, max_lag)
            train_start = time.perf_counter()
            learner_metrics = self.train([tasks[i] for i in fresh], [summaries[i] for i in fresh],
                                         [scored[tasks[i].spec.batch_id][0] for i in fresh])
            time_train = time.perf_counter() - train_start
            self.policy_version = learner_metrics.pop("policy_version")

            broadcast_start = time.perf_counter()
            self.broadcast()
            now = time.perf_counter()
            started, epoch_start = epoch_start, now
            time_broadcast, time_epoch = now - broadcast_start, now - started
            # the next epoch's sampling needs only the weights just put: it runs while this
            # epoch is recorded (none after a Ctrl-C: this epoch is the last)
            if not self.stop_requested.is_set():
                sample_up_to(epoch + 1 + max_lag)
            busy = self.busy_fractions(time_epoch)

            # the checkpoint first: a metrics line never runs ahead of the checkpoint it is due
            if is_checkpoint_epoch(config, epoch):
                self.save_checkpoint()
            trajectories = ray.get([task.trajectory_ref for task in tasks]) if config.save_latents else summaries
            metrics = self.recorder.record_epoch(
                epoch, self.policy_version,
                table=pa.Table.from_batches(trajectories),
                scored=[scored[task.spec.batch_id] for task in tasks],
                learner_metrics={**learner_metrics, **{f"busy_{role}": busy[role] for role in ROLES}},
                dropped_stale=len(tasks) - len(fresh),
                # sampling may have started during the last epoch's recording (lag 0) or epochs
                # before (lag >= 1): the time it held this epoch up counts
                timings={"time_sample_s": max(0.0, sampled_at - started), "time_reward_s": scored_at - sampled_at,
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
