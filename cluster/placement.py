"""Where the actors run: one placement group with a bundle per actor, from the config's
resources (CPUs, GPUs, fractions allowed, and custom resources for node pinning). The same
config works on a 1-GPU box and on a multi-node cluster; asking for more than exists fails at
once, naming what was asked and what the cluster has."""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ddpo.config import ActorResources, Config


class PlacementError(RuntimeError):
    """The actors cannot be placed on this cluster; the message names the config keys."""


def _bundle(resources: ActorResources) -> dict[str, float]:
    wanted = {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **resources.resources}
    return {name: amount for name, amount in wanted.items() if amount > 0}


class Placement:
    """Bundles in the order learner, sampler-0..N-1, reward-0..M-1; an actor that asks for no
    resources at all (a CPU reward by default) is scheduled outside the group."""

    def __init__(self, config: Config):
        c = config.cluster
        self.roles = [("learner", c.learner)]
        self.roles += [(f"sampler-{i}", c.sampler) for i in range(c.num_samplers)]
        self.roles += [(f"reward-{i}", c.reward) for i in range(c.num_reward_actors)]
        self._check_totals(c)
        bundles = [_bundle(resources) for _, resources in self.roles]
        self.index = {}
        for name, bundle in zip((name for name, _ in self.roles), bundles):
            if bundle:
                self.index[name] = len(self.index)
        self.group = placement_group([b for b in bundles if b], strategy=c.placement_strategy, name="ddpo")
        try:
            ray.get(self.group.ready(), timeout=c.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.group)
            raise PlacementError(
                f"cluster: the actors' bundles ({[b for b in bundles if b]}, strategy "
                f"{c.placement_strategy}) could not be placed within cluster.placement_timeout_s="
                f"{c.placement_timeout_s:g}s on nodes with {_nodes()}; lower the resources or use "
                "placement_strategy SPREAD"
            ) from None

    def _check_totals(self, c) -> None:
        asked: dict[str, float] = {}
        for _, resources in self.roles:
            for name, amount in _bundle(resources).items():
                asked[name] = asked.get(name, 0.0) + amount
        have = ray.cluster_resources()
        for name, amount in asked.items():
            if amount > have.get(name, 0.0) + 1e-9:
                key = {"CPU": "num_cpus", "GPU": "num_gpus"}.get(name, f"resources.{name}")
                raise PlacementError(
                    f"cluster: the actors ask for {amount:g} {name} in all ({c.num_samplers} samplers, "
                    f"{c.num_reward_actors} reward actors, 1 learner) but the Ray cluster has "
                    f"{have.get(name, 0.0):g}; lower cluster.*.{key} or cluster.num_samplers"
                )

    def options(self, name: str) -> dict:
        """Ray actor options for the actor `name`: its resources, in its bundle."""
        resources = dict(self.roles)[name]
        options = {"name": name, "num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus,
                   "resources": dict(resources.resources)}
        if name in self.index:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=self.index[name]
            )
        return options

    def remove(self) -> None:
        remove_placement_group(self.group)


def _nodes() -> list[dict[str, float]]:
    return [{k: v for k, v in node["Resources"].items() if k in ("CPU", "GPU") or not k.startswith("node:")}
            for node in ray.nodes() if node["Alive"]]
