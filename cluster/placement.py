"""Where the actors run: the layout (which actors share a device), then one placement group
with a bundle per device, from the config's resources (CPUs, GPUs, fractions allowed, custom
resources for node pinning). The same config works on a laptop, a 1-GPU box and a multi-node
cluster; asking for more than exists fails at once, naming what was asked and what the
cluster has.

Layouts (`cluster.layout`):
- colocated (max_policy_lag 0): sampler i and learner rank i share device i, as one actor,
  `worker-<i>` (actors.worker.ColocatedWorker: one model, sampling then training). Its bundle is
  the larger of the sampler's and the learner's asks. A device beyond the shorter of the two
  counts holds a lone `sampler-<i>` or `learner-<i>`.
- separate (max_policy_lag >= 1): every sampler and learner has a bundle of its own, so that
  sampling the next epoch overlaps training on this one.
Reward actors have a bundle each (none when they ask for no resources at all: a CPU reward);
a run that scores on a reward service (`reward.service`) has none of its own.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ddpo.config import ActorResources, ClusterConfig, Config
from ddpo.errors import PlacementError

# `auto` counts on a CPU model: one device per core, up to this many (the tiny models gain
# little from more ranks than this, and every rank holds its own copy of the model)
MAX_AUTO_CPU_DEVICES = 4


def _floor4(value: float) -> float:
    """Ray keeps resource amounts to 4 decimals: round down, so that the shares still fit."""
    return math.floor(value * 1e4) / 1e4


def _uses_gpu(config: Config, cluster_resources: dict[str, float]) -> bool:
    device = config.model.device
    return device.startswith("cuda") or (device == "auto" and cluster_resources.get("GPU", 0) > 0)


def resolve_layout(config: Config, cluster_resources: dict[str, float]) -> Config:
    """A copy of `config` with every `auto` of `cluster` made explicit for this cluster:
    the counts, the layout, the samplers' and learners' CPUs and torch threads."""
    config = copy.deepcopy(config)
    c = config.cluster
    if config.reward.service is not None:  # it scores on a reward service's actors (cluster.reward_service),
        c.num_reward_actors = 0  # started already: `cluster_resources` is what they leave
    if c.reward.num_cpus == "auto":  # a reward actor asks for what its config says, no share
        c.reward.num_cpus = 0.0
    free_cpus = cluster_resources.get("CPU", 0.0) - c.num_reward_actors * c.reward.num_cpus
    gpu = _uses_gpu(config, cluster_resources)
    if gpu:  # one device per GPU the reward actors leave whole
        devices = int(cluster_resources.get("GPU", 0.0) - c.num_reward_actors * c.reward.num_gpus)
    else:
        devices = min(int(free_cpus), MAX_AUTO_CPU_DEVICES)
    devices = max(1, devices)
    if c.num_samplers == "auto":
        c.num_samplers = min(devices, config.sample.num_batches_per_epoch)
    if c.num_learners == "auto":
        c.num_learners = min(devices, config.train.batch_size)
    if c.layout == "auto":
        c.layout = "colocated" if c.max_policy_lag == 0 else "separate"
    num_devices = (max(c.num_samplers, c.num_learners) if c.layout == "colocated"
                   else c.num_samplers + c.num_learners)
    for role in (c.sampler, c.learner):
        if role.num_cpus == "auto":  # the cluster's CPUs shared by the devices (1 beside a GPU)
            role.num_cpus = 1.0 if gpu else max(0.01, _floor4(free_cpus / num_devices))
    return config


def _bundle(resources: ActorResources) -> dict[str, float]:
    wanted = {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **resources.resources}
    return {name: amount for name, amount in wanted.items() if amount > 0}


@dataclass
class Devices:
    """What the layout asks of Ray: the bundles (one per device, then one per reward actor that
    asks for resources), which bundle each actor runs in, its share of the bundle, and its torch
    threads."""

    members: list[list[str]]  # the actors of each device, e.g. ["worker-0"] or ["sampler-1"]
    bundles: list[dict[str, float]]
    index: dict[str, int]  # actor -> bundle (absent: no resources, outside the group)
    asks: dict[str, dict[str, float]]
    threads: dict[str, int]

    @classmethod
    def of(cls, cluster: ClusterConfig) -> Devices:
        """The devices of a resolved cluster config (`resolve_layout`): colocated, worker-i (then
        the lone samplers or learners); separate, the learners, then the samplers; then the
        reward actors. One actor per device."""
        c = cluster
        rewards = [f"reward-{j}" for j in range(c.num_reward_actors)]
        roles = {name: [c.reward] for name in rewards}  # the roles each actor plays
        if c.layout == "colocated":
            for i in range(max(c.num_samplers, c.num_learners)):
                if i < min(c.num_samplers, c.num_learners):
                    roles[f"worker-{i}"] = [c.sampler, c.learner]
                else:
                    roles[f"sampler-{i}" if i < c.num_samplers else f"learner-{i}"] = [
                        c.sampler if i < c.num_samplers else c.learner]
        else:
            roles.update({f"learner-{i}": [c.learner] for i in range(c.num_learners)})
            roles.update({f"sampler-{i}": [c.sampler] for i in range(c.num_samplers)})
        names = [name for name in roles if name not in rewards] + rewards
        devices = cls([[name] for name in names], [], {}, {}, {})
        for name in names:
            bundle: dict[str, float] = {}
            for resources in roles[name]:  # a worker: the larger of the sampler's and the learner's asks
                for key, amount in _bundle(resources).items():
                    bundle[key] = max(bundle.get(key, 0.0), amount)
            devices.asks[name] = {key: _floor4(amount) for key, amount in bundle.items()}
            threads = {r.num_threads for r in roles[name]} - {"auto"}
            devices.threads[name] = max(threads) if threads else max(1, int(bundle.get("CPU", 0.0)))
            if bundle:
                devices.index[name] = len(devices.bundles)
                devices.bundles.append(bundle)
        return devices

    @property
    def num_devices(self) -> int:
        """The devices that sample or train (the reward actors' are not counted)."""
        return sum(1 for names in self.members if not names[0].startswith("reward-"))

    def totals(self) -> dict[str, float]:
        """The resources of all bundles together."""
        asked: dict[str, float] = {}
        for bundle in self.bundles:
            for name, amount in bundle.items():
                asked[name] = asked.get(name, 0.0) + amount
        return asked

    def describe(self) -> str:
        """One line: the devices and what each holds, e.g. for the run's log."""
        parts = []
        for names in self.members:
            bundle = self.bundles[self.index[names[0]]] if names[0] in self.index else {}
            what = ", ".join(f"{amount:g} {key}" for key, amount in bundle.items()) or "no resources"
            threads = self.threads[names[0]]
            name = names[0]
            roles = "samples and trains, " if name.startswith("worker-") else ""
            parts.append(f"{name} ({roles}{what}, {threads} thread{'s' if threads > 1 else ''})")
        return "; ".join(parts)


class Placement:
    """One placement group with the bundles of `Devices`; `config` is resolved
    (`resolve_layout`)."""

    def __init__(self, config: Config):
        c = config.cluster
        self.devices = Devices.of(c)
        self.threads = self.devices.threads
        self.counts = (c.num_samplers, c.num_learners, c.num_reward_actors)
        bundles = self.devices.bundles
        self._check_totals()
        self.group = placement_group(bundles, strategy=c.placement_strategy, name="ddpo")
        try:
            ray.get(self.group.ready(), timeout=c.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.group)
            raise PlacementError(
                f"cluster: the actors' bundles ({bundles}, strategy "
                f"{c.placement_strategy}) could not be placed within cluster.placement_timeout_s="
                f"{c.placement_timeout_s:g}s on nodes with {_nodes()}; lower the resources or use "
                "placement_strategy SPREAD"
            ) from None

    def _check_totals(self) -> None:
        asked = self.devices.totals()
        have = ray.cluster_resources()
        num_samplers, num_learners, num_rewards = self.counts
        for name, amount in asked.items():
            if amount > have.get(name, 0.0) + 1e-9:
                key = {"CPU": "num_cpus", "GPU": "num_gpus"}.get(name, f"resources.{name}")
                raise PlacementError(
                    f"cluster: the actors ask for {amount:g} {name} in all ({num_samplers} samplers, "
                    f"{num_learners} learners, {num_rewards} reward actors) but the Ray cluster has "
                    f"{have.get(name, 0.0):g}; lower cluster.*.{key} or the actor counts"
                )

    def describe(self) -> str:
        return self.devices.describe()

    def options(self, name: str) -> dict:
        """Ray actor options for the actor `name`: its share of its device, in its bundle."""
        ask = dict(self.devices.asks[name])
        options = {"name": name, "num_cpus": ask.pop("CPU", 0.0), "num_gpus": ask.pop("GPU", 0.0),
                   "resources": ask}
        if name in self.devices.index:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=self.devices.index[name]
            )
        return options

    def remove(self) -> None:
        remove_placement_group(self.group)


def _nodes() -> list[dict[str, float]]:
    return [{k: v for k, v in node["Resources"].items() if k in ("CPU", "GPU") or not k.startswith("node:")}
            for node in ray.nodes() if node["Alive"]]
