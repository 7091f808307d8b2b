"""The DDPO driver on Ray: sample -> reward -> train -> broadcast, one epoch at a time.

    samplers (sampler-<i>) --Arrow trajectories--> reward pool (reward-<j>) --rewards--> learners
        ^                                                                    (learner-<r>, one group)
        +-------------------- one ObjectRef per LoRA version (policy_version) -------------+

With `cluster.max_policy_lag = k`, sampling runs up to k epochs ahead of the learner, with the
newest weights the learner has put; batches more than k versions old are dropped and counted.
k = 0 is the paper's synchronous algorithm.
"""

from __future__ import annotations

import contextlib
import json
import shutil
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
from cluster.remote import CONCURRENCY_GROUPS, RewardActor, restart_options
from cluster.remote_policy import LearnerActor, SamplerActor, WorkerActor
from cluster.reward_pool import RewardPool
from cluster.reward_service import connect_service
from cluster.run_dir import (RunRecorder, eval_metrics, is_checkpoint_epoch, latest_checkpoint, read_metrics,
                             resume_checkpoint, with_rewards)
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


class RolledBack(Exception):
    """The reward-hacking guard rolled the learners back to the best held-out checkpoint: the
    run goes on from `epoch`."""

    def __init__(self, epoch: int):
        super().__init__(epoch)
        self.epoch = epoch


# the reward-hacking guard's rollbacks in a run: each halves the learning rate; after the last,
# the next time the guard fires it stops the run
MAX_ROLLBACKS = 3


class WriteFailed(RunError):
    """Writing the run directory failed mid-run (a full disk, say): the run stopped, and the
    checkpoints written before stay whole."""


@dataclass
class SampleTask:
    spec: SampleBatchSpec
    trajectory_ref: ray.ObjectRef  # the full trajectories (with latents), for the learner
    summary_ref: ray.ObjectRef  # the same rows without latents, for rewards and the run dir


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
    def __init__(self, config: Config, run_dir: Path, stop_requested: threading.Event | None = None):
        # with `reward.service`, the run scores on that service's actors and starts none of its own
        self.reward_service = connect_service(config.reward) if config.reward.service is not None else None
        cluster_resources = ray.cluster_resources()
        if self.reward_service is not None:
            cluster_resources = self.reward_service.resources_left(cluster_resources)
        config = resolve_layout(config, cluster_resources)
        self.config = config
        self.run_dir = run_dir
        self.prompts = config.load_prompts()
        self.prompt_metadata = config.load_prompt_metadata()
        c = config.cluster
        self.placement = Placement(config)
        self.policy_version = 0
        self.weights: tuple[int, list[ray.ObjectRef]] | None = None  # set by broadcast()
        self.metrics = DriverMetrics()
        self.grafana_dashboard = self._install_grafana_dashboard()
        self.recorder = RunRecorder(run_dir, self.placement.devices.num_devices)
        # set by a stop signal (`ddpo train`: Ctrl-C, SIGTERM, SIGHUP): fit() returns at the next
        # safe point (see fit), and the caller writes the checkpoint
        self.stop_requested = stop_requested or threading.Event()
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
        self.epoch_start = time.perf_counter()
        self.last_checkpoint_at = time.monotonic()  # for `checkpoint_every_s`
        self.completed = False  # fit() trained the last epoch
        r = config.reward
        self.guard = HackingGuard(r.heldout_tolerance, r.heldout_patience) if r.heldout else None
        self.guard_stop: str | None = None  # the guard stopped the run: its line
        self.rollbacks = 0
        self.last_eval: tuple[int, pa.Table] | None = None  # (policy_version, the eval batch scored)

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

    def resume_hint(self) -> str:
        """Where the run can go on from."""
        checkpoint = resume_checkpoint(self.run_dir)
        return (f"go on from {checkpoint} with: ddpo train --resume {self.run_dir}" if checkpoint
                else "no checkpoint was written yet (see checkpoint_every)")

    def write_failed(self, what: str, err: OSError) -> WriteFailed:
        """One line for a failed write of the run directory: `what` failed with `err`."""
        return WriteFailed(f"writing {what} failed ({err}); the run stopped; {self.resume_hint()}")

    # -- stages -------------------------------------------------------------------------------

    def broadcast(self) -> None:
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

    def submit_sampling(self, epoch: int) -> list[SampleTask]:
        tasks = []
        for i, spec in enumerate(epoch_plan(self.config, self.prompts, epoch)):
            sampler = self.samplers[i % len(self.samplers)]
            trajectory_ref, summary_ref = sampler.sample.options(num_returns=2).remote(
                spec.batch_id, spec.prompts, spec.seeds, spec.sde_start, *self.weights
            )
            tasks.append(SampleTask(spec, trajectory_ref, summary_ref))
        return tasks

    def collect(self, tasks: list[SampleTask], progress: tqdm) -> tuple[dict, float, float] | None:
        """Wait for an epoch's sample batches, queueing each for the reward pool as soon as it is
        made. Returns ({batch_id: (rewards, info)}, when the last batch was sampled, when the
        last was scored), as `time.perf_counter()` readings; None once a stop is asked for."""
        start = time.perf_counter()
        waiting = {task.summary_ref: task.spec for task in tasks}
        scored: dict[str, tuple[np.ndarray, dict]] = {}
        sampled_at = start
        while len(scored) < len(tasks):
            if self.stop_requested.is_set():
                return None
            if waiting:
                ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
                for ref in ready:
                    spec = waiting.pop(ref)
                    self.reward_pool.submit(ref, len(spec.prompts), self.metadata_of(spec.prompts))
                if not waiting:
                    sampled_at = time.perf_counter()
            for batch_id, rewards, info in self.reward_pool.poll(wake_on=list(waiting), max_wait_s=STOP_POLL_S):
                if batch_id not in scored:  # a batch id counts once
                    scored[batch_id] = (rewards, info)
                    progress.update(len(rewards))
            self.metrics.queues(sampling=len(waiting), scoring=self.reward_pool.num_items)
        return scored, sampled_at, time.perf_counter()

    def metadata_of(self, prompts: list[str]) -> dict[str, dict]:
        """The metadata of these prompts that have some (a JSON Lines prompts file's), for the reward."""
        return {prompt: self.prompt_metadata[prompt] for prompt in prompts if prompt in self.prompt_metadata}

    def evaluate(self, when: str) -> dict[str, float]:
        """Sample and score the fixed eval batch with the current weights, by the trained reward
        and the held-out one (`reward.heldout`), and record it as `samples/eval_<when>.parquet`;
        returns its `eval_metrics`. The batch of this very policy version is not sampled twice."""
        if self.last_eval is not None and self.last_eval[0] == self.policy_version:
            table = self.last_eval[1]
        else:
            spec = eval_plan(self.config, self.prompts)
            _, summary_ref = self.samplers[0].sample.options(num_returns=2).remote(
                spec.batch_id, spec.prompts, spec.seeds, spec.sde_start, *self.weights)
            actor, metadata = self.reward_actors[0], self.metadata_of(spec.prompts)
            kinds = [False, True] if self.config.reward.heldout else [False]
            scored = ray.get([actor.score.remote(summary_ref, prompt_metadata=metadata, heldout=heldout)
                              for heldout in kinds])
            table = pa.Table.from_batches([ray.get(summary_ref)])
            for ((_, rewards, info),), column in zip(scored, ["reward", "heldout"]):
                table = with_rewards(table, rewards, info, column)
            self.last_eval = (self.policy_version, table)
        self.recorder.record_eval(when, self.policy_version, table)
        return eval_metrics(table)

    def guard_against_hacking(self, epoch: int, metrics: dict[str, float]) -> str | None:
        """Give the guard this epoch's evaluation (`ddpo.guard`): keep `checkpoints/best` at the
        best held-out one, and when the guard fires, warn, stop or roll back
        (`reward.heldout_action`). Returns the action taken, if any."""
        evaluation = Evaluation(epoch, metrics["eval_reward_mean"], metrics["heldout_reward_mean"])
        is_best, fired = self.guard.observe(evaluation)
        if is_best:
            self.save_best()
        if not fired:
            return None
        action = self.config.reward.heldout_action
        if action == "rollback" and self.rollbacks >= MAX_ROLLBACKS:
            action = "stop"
        best = self.run_dir / "checkpoints" / "best"
        line = (f"{self.guard.warning(evaluation, ' + '.join(t.name for t in self.config.reward.heldout))}; "
                f"best held-out checkpoint: {best} (epoch {self.guard.best.epoch})")
        line += {"warn": "; training goes on (reward.heldout_action: warn)",
                 "stop": "; the run stops here",
                 "rollback": "; rolling back to it at half the learning rate"}[action]
        print(line, file=sys.stderr, flush=True)
        with open(self.run_dir / "guard.jsonl", "a") as f:  # kept across rollbacks, which cut metrics.jsonl
            f.write(json.dumps({"epoch": epoch, "action": action, **vars(evaluation),
                                "best": vars(self.guard.best)}) + "\n")
        if action == "stop":
            self.guard_stop = line
        elif action == "rollback":
            raise RolledBack(self.roll_back(best))
        return action

    def save_best(self) -> None:
        """`checkpoints/best`: a copy of this epoch's checkpoint (written now if not yet), made
        whole before it replaces the last best."""
        saved = self.save_checkpoint()
        root = self.run_dir / "checkpoints"
        partial, best = root / ".best.partial", root / "best"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            shutil.copytree(saved, partial)
            shutil.rmtree(best, ignore_errors=True)
            partial.rename(best)
        except OSError as err:
            raise self.write_failed("the best checkpoint", err) from None

    def roll_back(self, best: Path) -> int:
        """Load `best` into every learner rank at half the learning rate; the epochs after it
        are redone (their checkpoints move to `checkpoints/rolled_back_<n>/`, out of a resume's
        way, and their metrics are cut). Returns the epoch to go on from."""
        self.rollbacks += 1
        self.guard.streak = 0  # a streak counts from the weights rolled back to
        versions = get_all([learner.roll_back.remote(best, 0.5) for learner in self.learners])
        self.policy_version = versions[0]
        root = self.run_dir / "checkpoints"
        for path in root.glob("epoch_*"):
            if int(path.name.removeprefix("epoch_")) >= self.policy_version:
                (root / f"rolled_back_{self.rollbacks}").mkdir(exist_ok=True)
                path.rename(root / f"rolled_back_{self.rollbacks}" / path.name)
        self.recorder.restart_at(self.policy_version)
        self.last_eval = None  # its version number comes again, with other weights
        self.in_flight.clear()  # sampled with the weights rolled back from
        self.next_epoch = self.policy_version
        self.reward_pool = self._reward_pool()
        self.broadcast()
        self.sample_up_to(self.policy_version + self.config.cluster.max_policy_lag)
        self.epoch_start = time.perf_counter()
        return self.policy_version

    # -- the loop -----------------------------------------------------------------------------

    def train(self, tasks: list[SampleTask], summaries: list[pa.RecordBatch], rewards: list[np.ndarray]) -> dict:
        """One update on every learner rank; each fetches its samples' batches itself."""
        epoch = EpochTrajectories.describe(summaries)
        trajectory_refs = [task.trajectory_ref for task in tasks]
        results = get_all([learner.train_on.remote(epoch, trajectory_refs, rewards) for learner in self.learners])
        return results[0]  # the ranks' diagnostics are summed across the group: all the same

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

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes it: every rank holds the same state."""
        try:
            saved = ray.get(self.learners[0].save_checkpoint.remote(self.run_dir / "checkpoints"))
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, OSError):
                raise self.write_failed("the checkpoint", err.cause) from None
            raise
        self.last_checkpoint_at = time.monotonic()
        return saved

    def checkpoint_due(self, epoch: int) -> bool:
        """`checkpoint_every` epochs, the last epoch, or `checkpoint_every_s` seconds since the
        last checkpoint."""
        every_s = self.config.checkpoint_every_s
        return (is_checkpoint_epoch(self.config, epoch)
                or (every_s > 0 and time.monotonic() - self.last_checkpoint_at >= every_s))

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

    def fit(self, start_epoch: int = 0) -> list[dict]:
        """Train from `start_epoch` to the end; returns the epochs' metrics. When a stop is asked
        for (`stop_requested`), it returns at the next safe point, where the learner's state
        and the run's record agree: at once while an epoch is sampled and scored (that epoch is
        dropped: a resume samples it again, the same batch ids and seeds), else after the
        update under way and its epoch's record. The checkpoint is the caller's to write."""
        config = self.config
        max_lag = config.cluster.max_policy_lag
        self.last_checkpoint_at, self.completed = time.monotonic(), False
        self.broadcast()
        if start_epoch == 0 and config.eval_images and not self.stop_requested.is_set():
            self.evaluate("before")
        self.in_flight.clear()
        self.next_epoch = start_epoch
        history: list[dict] = []
        self.sample_up_to(start_epoch + max_lag)  # sampling runs up to max_lag epochs ahead of the learner
        self.epoch_start = time.perf_counter()
        epoch = start_epoch
        with tqdm(desc="epochs", unit="epoch", initial=start_epoch, total=config.num_epochs) as epochs:
            while epoch < config.num_epochs and not self.stop_requested.is_set():
                try:
                    metrics = self.run_epoch(epoch)
                except RolledBack as rolled_back:
                    epoch = rolled_back.epoch
                    history = [m for m in history if m["epoch"] < epoch]
                    epochs.n = epoch
                    epochs.refresh()
                    continue
                except ray.exceptions.RayError as err:
                    if self.stop_requested.is_set():  # stopping: no learner group restarted now
                        raise
                    epoch = self.recover_learners(err)  # re-raises what a learner's loss does not explain
                    history = [m for m in history if m["epoch"] < epoch]
                    epochs.n = epoch
                    epochs.refresh()
                    continue
                if metrics is None:  # stopped before the epoch's update
                    return history
                epochs.update()
                epochs.set_postfix(reward=f"{metrics['reward_mean']:.4f}", kl=f"{metrics['approx_kl'] or 0:.1e}")
                history.append(metrics)
                epoch += 1
                if self.guard_stop is not None:
                    break
        self.completed = epoch >= config.num_epochs
        if config.eval_images and not self.stop_requested.is_set():
            self.evaluate("after")
        return history

    def sample_up_to(self, last_epoch: int) -> None:
        """Submit the sampling of every epoch up to `last_epoch` not submitted yet."""
        while self.next_epoch < self.config.num_epochs and self.next_epoch <= last_epoch:
            self.in_flight.append(self.submit_sampling(self.next_epoch))
            self.next_epoch += 1

    def run_epoch(self, epoch: int) -> dict | None:
        """Collect the epoch's samples and rewards, train, put the new weights, record; returns
        the epoch's metrics (None: a stop was asked for before its update)."""
        config = self.config
        max_lag = config.cluster.max_policy_lag
        tasks = self.in_flight[0]
        with tqdm(total=config.samples_per_epoch, desc=f"epoch {epoch} sample+reward",
                  unit="img", leave=False) as progress:
            collected = self.collect(tasks, progress)
        if collected is None:
            return None
        scored, sampled_at, scored_at = collected
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
        self.in_flight.popleft()
        eval_start = time.perf_counter()
        evaluated: dict = {}
        if config.eval_every and (epoch + 1) % config.eval_every == 0 and config.eval_images:
            evaluated = self.evaluate(f"epoch_{epoch:04d}")
            action = self.guard_against_hacking(epoch, evaluated) if self.guard is not None else None
            if action is not None:
                evaluated["heldout_guard"] = action
            evaluated["time_eval_s"] = time.perf_counter() - eval_start
        now = time.perf_counter()
        started, self.epoch_start = self.epoch_start, now
        time_broadcast, time_epoch = eval_start - broadcast_start, now - started
        # the next epoch's sampling needs only the weights just put: it runs while this
        # epoch is recorded (none after a stop signal: this epoch is the last)
        if not self.stop_requested.is_set():
            self.sample_up_to(epoch + 1 + max_lag)
        usage = self.usage(time_epoch)

        # the checkpoint first: a metrics line never runs ahead of the checkpoint it is due
        if self.checkpoint_due(epoch):
            self.save_checkpoint()
        trajectories = ray.get([task.trajectory_ref for task in tasks]) if config.save_latents else summaries
        try:
            metrics = self.recorder.record_epoch(
                epoch, self.policy_version,
                table=pa.Table.from_batches(trajectories),
                scored=[scored[task.spec.batch_id] for task in tasks],
                learner_metrics={**learner_metrics, **usage, **evaluated, "learner_restarts": self.learner_restarts},
                dropped_stale=len(tasks) - len(fresh),
                # sampling may have started during the last epoch's recording (lag 0) or epochs
                # before (lag >= 1): the time it held this epoch up counts
                timings={"time_sample_s": max(0.0, sampled_at - started), "time_reward_s": scored_at - sampled_at,
                         "time_train_s": time_train, "time_broadcast_s": time_broadcast,
                         "time_epoch_s": time_epoch},
            )
        except OSError as err:
            raise self.write_failed("the run directory", err) from None
        self.metrics.epoch(metrics)
        return metrics

    # -- learner recovery ---------------------------------------------------------------------

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
        # sampling and scoring under way are dropped: the epochs from `epoch` on are redone
        self.in_flight.clear()
        self.next_epoch = epoch
        self.reward_pool = self._reward_pool()
        self.broadcast()
        self.sample_up_to(epoch + self.config.cluster.max_policy_lag)
        self.epoch_start = time.perf_counter()
        source = checkpoint.name if checkpoint is not None else "the initial weights"
        print(f"{', '.join(dead)} died: the learner group was restarted from {source} in "
              f"{time.perf_counter() - started:.1f} s (restart {self.learner_restarts} of "
              f"cluster.learner_max_restarts={self.config.cluster.learner_max_restarts}); "
              f"epochs {epoch} on are redone", file=sys.stderr, flush=True)
        return epoch
