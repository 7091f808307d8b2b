"""The DDPO driver on Ray: the stages of `cluster.loop` (sample -> reward -> train -> sync ->
checkpoint -> record), done by actors.

    samplers (sampler-<i>) --Arrow trajectories--> reward pool (reward-<j>) --rewards--> learners
        ^                                                                    (learner-<r>, one group)
        +-------------------- one ObjectRef per LoRA version (policy_version) -------------+

The reward pool scores each sample batch as soon as it is made: the sample stage waits for the
last batch, the reward stage for what is left to score then. With `cluster.max_policy_lag = k`,
sampling runs up to k epochs ahead of the learner, with the newest weights the learner has put;
batches more than k versions old are dropped and counted. k = 0 is the paper's synchronous
algorithm.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from tqdm.auto import tqdm

from cluster.loop import EpochLoop, StageTimer, with_scores
from cluster.metrics import ROLES, DriverMetrics, install_grafana_dashboard
from cluster.placement import Placement, resolve_layout
from cluster.remote import RewardActor, start_actor
from cluster.remote_policy import LearnerActor, SamplerActor, WorkerActor
from cluster.reward_pool import RewardPool
from cluster.reward_service import connect_service
from cluster.run_dir import RunRecorder, latest_checkpoint, read_metrics
from ddpo.config import Config
from ddpo.errors import RunError
from ddpo.guard import Evaluation, HackingGuard
from ddpo.plan import SampleBatchSpec, epoch_plan, eval_plan, fresh_batches
from ddpo.trajectory import EpochTrajectories


# how long a live learner rank may take to answer whether it is alive
LIVENESS_TIMEOUT_S = 30.0
# how often the wait for an epoch's samples looks whether a stop was asked for
STOP_POLL_S = 0.25


class ActorLost(RunError):
    """An actor died for good (a sampler or reward actor out of restarts, a learner rank after
    the learner group's restarts)."""


@dataclass
class SampleTask:
    spec: SampleBatchSpec
    trajectory_ref: ray.ObjectRef  # the full trajectories (with latents), for the learner
    summary_ref: ray.ObjectRef  # the same rows without latents, for rewards and the run dir


@dataclass
class EpochBatches:
    """An epoch's sample batches, from the sample stage on: their tasks, their rewards as they
    come from the pool (`scored`, by batch id), and once all are made their summaries and which
    are fresh enough to train on (`ddpo.plan.fresh_batches`)."""
    tasks: list[SampleTask]
    progress: tqdm  # images scored
    scored: dict[str, tuple[np.ndarray, dict]] = field(default_factory=dict)
    summaries: list[pa.RecordBatch] = field(default_factory=list)
    fresh: list[int] = field(default_factory=list)


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


class Driver(EpochLoop):
    def __init__(self, config: Config, run_dir: Path, stop_requested: threading.Event | None = None):
        # with `reward.service`, the run scores on that service's actors and starts none of its own
        self.reward_service = connect_service(config.reward) if config.reward.service is not None else None
        cluster_resources = ray.cluster_resources()
        if self.reward_service is not None:
            cluster_resources = self.reward_service.resources_left(cluster_resources)
        config = resolve_layout(config, cluster_resources)
        self.placement = Placement(config)
        super().__init__(config, run_dir, RunRecorder(run_dir, self.placement.devices.num_devices), stop_requested)
        self.prompts = config.load_prompts()
        self.prompt_metadata = config.load_prompt_metadata()
        c = config.cluster
        self.weights: tuple[int, list[ray.ObjectRef]] | None = None  # set by sync()
        self.metrics = DriverMetrics()
        self.grafana_dashboard = self._install_grafana_dashboard()
        # the learner group's ranks (`learner-<r>`, or `worker-<r>` where rank r also samples); the
        # samplers by index: a worker, or a `sampler-<i>` of its own (`plain_samplers`)
        self.learners, self.learner_names, self.samplers, self.reward_actors = [], [], [], []
        self.plain_samplers: dict[int, object] = {}
        try:
            self.reward_actors = [self._start(RewardActor, f"reward-{i}", config.reward, restartable=True)
                                  for i in range(c.num_reward_actors)]
            if c.reward.num_gpus > 0:  # a vLLM engine sizes its cache from the GPU memory free at
                self._wait_ready(self.reward_actors)  # its start: start it before the diffusers actors
            self.plain_samplers = {i: self._start(SamplerActor, f"sampler-{i}", config, restartable=True)
                                   for i in range(c.num_samplers) if f"sampler-{i}" in self.placement.devices.asks}
            self.start_learners(loading=[*self.reward_actors, *self.plain_samplers.values()])
        except Exception:
            self.shutdown()
            raise
        if self.reward_service is not None:  # the pool's actors: the service's (none started above)
            self.reward_actors = list(self.reward_service.actors)
        self.reward_pool = self._reward_pool()
        self.reports: dict[str, dict] = {}  # per actor, its `report()` at the last epoch's end
        self.learner_restarts = 0  # the learner group's, by `recover_learners`
        self.in_flight: deque[list[SampleTask]] = deque()  # sampling submitted, an epoch per entry
        self.next_epoch = 0  # the first epoch whose sampling is not submitted yet

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
        return start_actor(cls, *args, options=self.placement.options(name), num_threads=self.placement.threads[name],
                           max_restarts=self.config.cluster.max_restarts if restartable else 0)

    def _reward_pool(self) -> RewardPool:
        reward = self.config.reward
        return RewardPool(self.reward_actors, reward.label, reward.max_batch_images, reward.timeout_s,
                          self.reward_service.names if self.reward_service is not None else None)

    def start_learners(self, loading: list = ()) -> None:
        """The learner group's ranks, each with its model loaded, joined in one group: rank 0's
        rendezvous reaches every rank through the driver, and all join together. `loading`:
        other actors just started, waited for with the ranks, so that an error in any of their
        constructors (a reward that fails to load) ends the start before the ranks have loaded."""
        c = self.config.cluster
        self.learner_names = [f"worker-{rank}" if f"worker-{rank}" in self.placement.devices.asks else f"learner-{rank}"
                              for rank in range(c.num_learners)]
        self.learners = [self._start(WorkerActor if name.startswith("worker-") else LearnerActor, name, self.config,
                                     rank, c.num_learners)
                         for rank, name in enumerate(self.learner_names)]
        self.samplers = [self.plain_samplers[i] if i in self.plain_samplers else self.learners[i]
                         for i in range(c.num_samplers)]
        self._wait_ready([*self.learners, *loading])
        if len(self.learners) == 1:
            return
        nodes = set(ray.get([learner.node_id.remote() for learner in self.learners]))
        init_method = ray.get(self.learners[0].init_method.remote(one_node=len(nodes) == 1))
        get_all([learner.join_group.remote(init_method) for learner in self.learners])

    @property
    def named_actors(self) -> dict[str, object]:
        return {**dict(zip(self.learner_names, self.learners)),
                **{f"sampler-{i}": a for i, a in self.plain_samplers.items()},
                **dict(zip(self.reward_service.names if self.reward_service is not None
                           else [f"reward-{i}" for i in range(len(self.reward_actors))], self.reward_actors))}

    @property
    def actors(self) -> list:
        return list(self.named_actors.values())

    @staticmethod
    def _wait_ready(actors: list) -> None:
        """The actors load their models in their constructors: wait for them, so that an error
        there surfaces now, whole, and no reward timeout counts a model load. ray.get raises
        the first error as soon as it comes, without waiting for the other actors to load."""
        ray.get([actor.ready.remote() for actor in actors])

    def shutdown(self) -> None:
        self.recorder.close()
        # the tasks still in flight (a stop signal came while an epoch was sampled) cancelled
        # first: the kills below would have Ray print, for each, that it will be retried
        pool = getattr(self, "reward_pool", None)
        for ref in [task.trajectory_ref for tasks in getattr(self, "in_flight", ()) for task in tasks] + \
                list(pool.running if pool else ()):
            ray.cancel(ref)
        if len(self.learners) > 1:  # the group's rendezvous file goes too (a dead rank: no wait)
            ray.wait([learner.leave_group.remote() for learner in self.learners],
                     num_returns=len(self.learners), timeout=5)
        for name, actor in self.named_actors.items():
            if self.reward_service is None or name not in self.reward_service.names:  # a service outlives runs
                ray.kill(actor)
        self.placement.remove()

    def lost_actor_message(self, err: ray.exceptions.RayActorError) -> str:
        """One line: which actor died, and where the run can go on from."""
        name = next((n for n, a in self.named_actors.items()
                     if a._actor_id.hex() == getattr(err, "actor_id", None)), None)
        name = name or next(iter(self.dead_learners()), "an actor")
        what = "was not restarted"
        if name in self.learner_names and self.learner_restarts:
            n = self.learner_restarts
            what = f"the learner group had its {n} restart{'s' if n > 1 else ''} (cluster.learner_max_restarts)"
        return f"the actor '{name}' died and {what}; {self.resume_hint()}"

    # -- the stages (cluster.loop) ------------------------------------------------------------

    def submit_sampling(self, epoch: int) -> list[SampleTask]:
        tasks = []
        for i, spec in enumerate(epoch_plan(self.config, self.prompts, epoch)):
            sampler = self.samplers[i % len(self.samplers)]
            trajectory_ref, summary_ref = sampler.sample.options(num_returns=2).remote(
                spec.batch_id, spec.prompts, spec.seeds, spec.sde_start, *self.weights
            )
            tasks.append(SampleTask(spec, trajectory_ref, summary_ref))
        return tasks

    def start_sampling(self, epoch: int) -> None:
        """Submit the sampling of every epoch up to `epoch + cluster.max_policy_lag` not
        submitted yet: sampling runs up to max_policy_lag epochs ahead of the learner."""
        last_epoch = epoch + self.config.cluster.max_policy_lag
        while self.next_epoch < self.config.num_epochs and self.next_epoch <= last_epoch:
            self.in_flight.append(self.submit_sampling(self.next_epoch))
            self.next_epoch += 1

    def go_on_from(self, epoch: int) -> None:
        """Drop the sampling and scoring under way: the epochs from `epoch` on are sampled again,
        the same batch ids and seeds (at lag 0, the same samples)."""
        self.in_flight.clear()
        self.next_epoch = epoch
        self.reward_pool = self._reward_pool()
        self.start_sampling(epoch)

    def sample(self, epoch: int) -> EpochBatches | None:
        """Wait until the epoch's sample batches are made (submitted at the last sync, or epochs
        before at lag >= 1: only the time it holds the epoch up counts), queueing each for the
        reward pool as soon as it is made. None once a stop is asked for."""
        tasks = self.in_flight[0]
        batches = EpochBatches(tasks, tqdm(total=self.config.samples_per_epoch, desc=f"epoch {epoch} sample+reward",
                                           unit="img", leave=False))
        waiting = {task.summary_ref: task.spec for task in tasks}
        try:
            while waiting:
                if self.stop_requested.is_set():
                    batches.progress.close()
                    return None
                ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
                for ref in ready:
                    spec = waiting.pop(ref)
                    self.reward_pool.submit(ref, len(spec.prompts), self.metadata_of(spec.prompts))
                if waiting:
                    self.take_rewards(batches, wake_on=list(waiting))
            batches.summaries = ray.get([task.summary_ref for task in tasks])
        except BaseException:
            batches.progress.close()
            raise
        # batches made with weights more than max_policy_lag versions old are not trained on
        batches.fresh = fresh_batches([s.column("policy_version")[0].as_py() for s in batches.summaries],
                                      self.policy_version, self.config.cluster.max_policy_lag)
        return batches

    def reward(self, batches: EpochBatches) -> dict[str, tuple[np.ndarray, dict]] | None:
        """Wait for the rewards the pool has still to give once the last batch is made:
        {batch_id: (rewards, info)}. None once a stop is asked for."""
        try:
            while len(batches.scored) < len(batches.tasks):
                if self.stop_requested.is_set():
                    return None
                self.take_rewards(batches)
        finally:
            batches.progress.close()
        return batches.scored

    def take_rewards(self, batches: EpochBatches, wake_on: list[ray.ObjectRef] = ()) -> None:
        """The rewards of the pool's calls that finish before one of `wake_on` (batches being
        sampled) is made, or STOP_POLL_S goes by."""
        for result in self.reward_pool.poll(wake_on=wake_on, max_wait_s=STOP_POLL_S):
            if result.batch_id not in batches.scored:  # a batch id counts once
                batches.scored[result.batch_id] = (result.rewards, result.info)
                batches.progress.update(len(result.rewards))
        self.metrics.queues(sampling=len(wake_on), scoring=self.reward_pool.num_items)

    def metadata_of(self, prompts: list[str]) -> dict[str, dict]:
        """The metadata of these prompts that have some (a JSON Lines prompts file's), for the reward."""
        return {prompt: self.prompt_metadata[prompt] for prompt in prompts if prompt in self.prompt_metadata}

    def train(self, batches: EpochBatches, scored: dict[str, tuple[np.ndarray, dict]]) -> dict:
        """One update on every learner rank, on the fresh batches; each rank fetches its
        samples' batches itself."""
        fresh = [batches.tasks[i] for i in batches.fresh]
        epoch = EpochTrajectories.describe([batches.summaries[i] for i in batches.fresh])
        rewards = [scored[task.spec.batch_id][0] for task in fresh]
        trajectory_refs = [task.trajectory_ref for task in fresh]
        results = get_all([learner.train_on.remote(epoch, trajectory_refs, rewards) for learner in self.learners])
        learner_metrics = results[0]  # the ranks' diagnostics are summed across the group: all the same
        self.policy_version = learner_metrics.pop("policy_version")
        self.in_flight.popleft()  # the epoch's sampling is spent
        return learner_metrics

    def sync(self) -> None:
        """Put the learner's LoRA into the object store once, for the samplers of their own
        devices (a worker samples with its rank's weights in place: none when every sampler is
        one). Every sample task from now on carries the one ref; a sampler loads it in place
        before its next batch. Because each task carries its weights, a task Ray retries on a
        restarted sampler has them too."""
        if not self.plain_samplers:
            self.weights = (self.policy_version, [])
            return
        weights_ref = self.learners[0].weights.remote()  # every rank holds the same weights
        ray.wait([weights_ref], fetch_local=False)
        self.weights = (self.policy_version, [weights_ref])  # in a list: resolved only on a new version

    def write_checkpoint(self, root: Path) -> Path | None:
        """Rank 0 writes it: every rank holds the same state."""
        try:
            return ray.get(self.learners[0].save_checkpoint.remote(root))
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, OSError):
                raise self.write_failed("the checkpoint", err.cause) from None
            raise

    def record(self, epoch: int, batches: EpochBatches, scored: dict[str, tuple[np.ndarray, dict]],
               learner_metrics: dict, timer: StageTimer) -> dict:
        """The epoch's record (the run directory, and the metrics exported for Prometheus), with
        each role's busy share of the epoch and the actors' memory (`usage`)."""
        tasks = batches.tasks
        trajectories = ray.get([task.trajectory_ref for task in tasks]) if self.config.save_latents \
            else batches.summaries
        usage = self.usage(timer.elapsed())
        try:
            metrics = self.recorder.record_epoch(
                epoch, self.policy_version,
                table=pa.Table.from_batches(trajectories),
                scored=[scored[task.spec.batch_id] for task in tasks],
                learner_metrics={**learner_metrics, **usage, "learner_restarts": self.learner_restarts},
                dropped_stale=len(tasks) - len(batches.fresh),
                timings=timer.close,
            )
        except OSError as err:
            raise self.write_failed("the run directory", err) from None
        self.metrics.epoch(metrics)
        return metrics

    def eval_batch(self) -> pa.Table:
        """The fixed eval batch, sampled by the first sampler and scored through the reward pool."""
        spec = eval_plan(self.config, self.prompts)
        _, summary_ref = self.samplers[0].sample.options(num_returns=2).remote(
            spec.batch_id, spec.prompts, spec.seeds, spec.sde_start, *self.weights)
        trained, heldout = self.reward_pool.score_all([(summary_ref, len(spec.prompts), self.metadata_of(spec.prompts))],
                                                      heldout=bool(self.config.reward.heldout))
        return with_scores(ray.get(summary_ref), trained, heldout)

    def roll_back_learner(self, checkpoint: Path, lr_factor: float) -> int:
        return get_all([learner.roll_back.remote(checkpoint, lr_factor) for learner in self.learners])[0]

    # -- resuming, usage ----------------------------------------------------------------------

    def resume(self, checkpoint: Path | None) -> int:
        """Load a checkpoint into every learner rank (None: they keep their initial weights);
        the run's record goes on from there. Returns the epoch to go on from."""
        if checkpoint is not None:
            versions = get_all([learner.load_checkpoint.remote(checkpoint) for learner in self.learners])
            self.policy_version = versions[0]
        self.recorder.restart_at(self.policy_version)
        if self.guard is not None:  # the guard sees the evaluations recorded up to here again
            self.guard = HackingGuard(self.guard.tolerance, self.guard.patience)
            for m in read_metrics(self.run_dir):
                if "heldout_reward_mean" in m:
                    self.guard.observe(Evaluation(m["epoch"], m["eval_reward_mean"], m["heldout_reward_mean"]))
        return self.policy_version

    def usage(self, seconds: float) -> dict[str, float | None]:
        """Since the last call, over `seconds` of wall time: each role's busy fraction (the share
        of its actors' time spent working: a worker counts in both of its roles), the denoisers'
        MFU (`actors.usage`; None where a device's peak is unknown), and the actors' memory now:
        the sum of their resident memory and of their GPU tensors' peaks."""
        names = list(self.named_actors)
        now = dict(zip(names, ray.get([self.named_actors[n].report.remote() for n in names])))
        busy, counts, flops = dict.fromkeys(ROLES, 0.0), dict.fromkeys(ROLES, 0), 0.0
        for name in names:  # a restarted actor counts from its restart
            before = self.reports.get(name, {"busy": {}, "flops": 0.0})
            for role, seconds_busy in now[name]["busy"].items():
                earlier = before["busy"].get(role, 0.0)
                busy[role] += seconds_busy - (earlier if seconds_busy >= earlier else 0.0)
                counts[role] += 1
            flops += now[name]["flops"] - (before["flops"] if now[name]["flops"] >= before["flops"] else 0.0)
        self.reports = now
        peaks = [now[name]["peak_flops"] for name in names if not name.startswith("reward-")]
        return {**{f"busy_{role}": busy[role] / (counts[role] * seconds) for role in ROLES},
                "mfu": flops / (seconds * sum(peaks)) if None not in peaks else None,
                "actors_rss_bytes": sum(report["rss_bytes"] for report in now.values()),
                "actors_gpu_peak_bytes": sum(report["gpu_peak_bytes"] for report in now.values())}

    # -- learner recovery ---------------------------------------------------------------------

    def recover(self, err: Exception) -> int:
        """A Ray error in an epoch: `recover_learners`; while stopping, none (no learner group
        is started again then). Any other error goes on to end the run."""
        if not isinstance(err, ray.exceptions.RayError) or self.stop_requested.is_set():
            raise err
        return self.recover_learners(err)

    def dead_learners(self) -> list[str]:
        """The learner ranks that have died (a live rank answers on its report thread, also
        while it waits in a collective)."""
        dead = []
        for name, learner in zip(self.learner_names, self.learners):
            try:
                ray.get(learner.report.remote(), timeout=LIVENESS_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                dead.append(name)
            except ray.exceptions.GetTimeoutError:
                pass
        return dead

    def recover_learners(self, err: ray.exceptions.RayError) -> int:
        """After `err`: when a learner rank has died, and restarts are left
        (`cluster.learner_max_restarts`), start the whole group again from the run's latest
        checkpoint (or from the initial weights) and return the epoch to replay from; the
        samplers resample those epochs' batches, the same batch ids and seeds (at lag 0 the
        same samples, so the run ends as if undisturbed). A rank that dies while the group
        restarts takes another restart. Otherwise re-raise `err`."""
        while True:
            dead = self.dead_learners()
            if not dead or self.learner_restarts >= self.config.cluster.learner_max_restarts:
                raise err
            self.learner_restarts += 1
            try:
                return self._restart_learners(dead)
            except ray.exceptions.RayError as again:
                err = again

    def _restart_learners(self, dead: list[str]) -> int:
        started = time.perf_counter()
        for learner in self.learners:  # the survivors wait in a collective with the dead rank
            ray.kill(learner)
        for learner in self.learners:  # their names are free once Ray has them dead
            with contextlib.suppress(ray.exceptions.RayActorError):
                ray.get(learner.report.remote())
        self.start_learners()
        self.policy_version, self.last_eval = 0, None
        checkpoint = latest_checkpoint(self.run_dir)
        epoch = self.resume(checkpoint)
        self.sync()
        self.go_on_from(epoch)  # sampling and scoring under way are dropped: the epochs from `epoch` on are redone
        self.epoch_start = time.perf_counter()
        source = checkpoint.name if checkpoint is not None else "the initial weights"
        print(f"{', '.join(dead)} died: the learner group was restarted from {source} in "
              f"{time.perf_counter() - started:.1f} s (restart {self.learner_restarts} of "
              f"cluster.learner_max_restarts={self.config.cluster.learner_max_restarts}); "
              f"epochs {epoch} on are redone", file=sys.stderr, flush=True)
        return epoch
