"""A reward service: reward actors that outlive any one run and score the batches of every run
on the cluster that names them.

    ddpo serve-rewards --config X [--name NAME]    start one (its actors detached; the command exits)
    reward.service: NAME                           a run sends its batches there, starts no reward actors
    ddpo serve-rewards --stop NAME                 end it

A service is `cluster.num_reward_actors` reward actors named `reward-service-<NAME>-<i>` in the
namespace `ddpo`, whatever the namespace of the run that uses it, each with `cluster.reward`'s
resources and `cluster.max_restarts` restarts (Ray reruns the calls in flight on a restarted
actor, whoever made them). A run builds its reward pool (cluster/reward_pool.py) over their
handles: the same batching, retries and timeouts as over actors of its own; the calls of several
runs queue at the actors. A GPU-resident reward (a VLM judge) is then loaded once for every run.

A run must score with the service's reward: `check_matches` compares the terms (names, weights,
params) and the held-out terms at the run's start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import ray

from cluster.remote import RewardActor, start_actor
from ddpo.config import ActorResources, Config, RewardConfig, RewardTerm
from ddpo.errors import RewardError

NAMESPACE = "ddpo"
ACTOR_PREFIX = "reward-service-"
DEFAULT_NAME = "rewards"


class RewardServiceError(RewardError):
    """A reward service missing, taken, or scoring another reward; the message names the key or
    command to fix."""


def actor_name(service: str, index: int) -> str:
    return f"{ACTOR_PREFIX}{service}-{index}"


def actor_resources(resources: ActorResources) -> tuple[dict, int]:
    """A reward actor's Ray options for `cluster.reward` (`auto` CPUs: none), and its torch threads."""
    num_cpus = 0.0 if resources.num_cpus == "auto" else resources.num_cpus
    threads = max(1, int(num_cpus)) if resources.num_threads == "auto" else resources.num_threads
    return {"num_cpus": num_cpus, "num_gpus": resources.num_gpus, "resources": dict(resources.resources)}, threads


class RewardServiceActor(RewardActor):
    """A reward actor of a service: it also says what it scores, and counts what it scored."""

    def __init__(self, service: str, reward: RewardConfig, options: dict, num_threads: int):
        super().__init__(reward, num_threads)
        self.description = {"service": service, "reward": reward, "options": options}
        self.images_scored = 0  # since the actor (re)started, for every run

    def score(self, *batches, prompt_metadata: dict[str, dict] | None = None, heldout: bool = False):
        scored = super().score(*batches, prompt_metadata=prompt_metadata, heldout=heldout)
        self.images_scored += sum(len(rewards) for _, rewards, _ in scored)
        return scored

    @ray.method(concurrency_group="report")
    def describe(self) -> dict:
        """The service's name, its reward config, the actor's Ray options, and the images it
        scored; answered from the report thread, also while the actor scores."""
        return {**self.description, "images_scored": self.images_scored}


@dataclass
class RewardService:
    name: str
    actors: list  # their handles, by index
    names: list[str]  # their Ray names
    reward: RewardConfig  # what the service scores
    options: dict  # each actor's num_cpus, num_gpus, resources

    def resources_left(self, cluster_resources: dict[str, float]) -> dict[str, float]:
        """The cluster's resources less what the service's actors hold."""
        held = {"CPU": self.options["num_cpus"], "GPU": self.options["num_gpus"], **self.options["resources"]}
        return {key: amount - len(self.actors) * held.get(key, 0.0) for key, amount in cluster_resources.items()}

    def describe(self) -> list[dict]:
        return ray.get([actor.describe.remote() for actor in self.actors])


def _running(service: str) -> list[str]:
    """The Ray names of the service's live (or restarting) actors, by index."""
    pattern = re.compile(re.escape(ACTOR_PREFIX + service) + r"-(\d+)")
    found = [(int(match.group(1)), entry["name"]) for entry in ray.util.list_named_actors(all_namespaces=True)
             if entry["namespace"] == NAMESPACE and (match := pattern.fullmatch(entry["name"]))]
    return [name for _, name in sorted(found)]


def start_service(config: Config, name: str) -> RewardService:
    """`cluster.num_reward_actors` detached reward actors scoring `config.reward`, each loaded:
    a reward that fails to load raises its own error, and the actors started are killed."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise RewardServiceError(f"--name: must be letters, digits, '_', '.' or '-', got {name!r}")
    if _running(name):
        raise RewardServiceError(f"--name: a reward service '{name}' is running on this cluster already; stop it "
                                 f"with `ddpo serve-rewards --stop {name}`, or choose another --name")
    c = config.cluster
    resources, threads = actor_resources(c.reward)
    names = [actor_name(name, i) for i in range(c.num_reward_actors)]
    actors = []
    try:
        for actor in names:  # detached: they outlive this process
            actors.append(start_actor(
                RewardServiceActor, name, config.reward, resources, num_threads=threads, max_restarts=c.max_restarts,
                options={**resources, "name": actor, "namespace": NAMESPACE, "lifetime": "detached"}))
        ray.get([actor.ready.remote() for actor in actors])
    except BaseException as err:
        _kill(actors)
        if isinstance(err, ValueError) and "already taken" in str(err):  # started meanwhile by another
            raise RewardServiceError(f"--name: a reward service '{name}' is running on this cluster already; "
                                     f"stop it with `ddpo serve-rewards --stop {name}`") from None
        raise
    return RewardService(name, actors, names, config.reward, resources)


def find_service(name: str, source: str = "reward.service") -> RewardService:
    """The running service `name`: its live actors' handles and what it scores."""
    names = _running(name)
    if not names:
        raise RewardServiceError(f"{source}: no reward service '{name}' on this cluster; start one with "
                                 f"`ddpo serve-rewards --config ... --name {name}`")
    actors = [ray.get_actor(actor, namespace=NAMESPACE) for actor in names]
    description = ray.get(actors[0].describe.remote())
    return RewardService(name, actors, names, description["reward"], description["options"])


def stop_service(name: str) -> int:
    """Kill the service's actors (no restart); returns how many there were. Their names are
    free on return."""
    service = find_service(name, "--stop")
    _kill(service.actors)
    return len(service.actors)


def _kill(actors: list) -> None:
    """Kill the actors for good, and wait until Ray has them dead: their names are free then."""
    for actor in actors:
        ray.kill(actor, no_restart=True)
    for actor in actors:  # dead once a call on it fails (one answered before the kill landed: ask again)
        while True:
            try:  # not retried: Ray would print that it retries it, for each actor
                ray.get(actor.__ray_ready__.options(max_task_retries=0).remote())
            except ray.exceptions.RayActorError:
                break


def _describe(terms: list[RewardTerm]) -> str:
    """Terms as the user wrote them: `aesthetic`, `0.7 * aesthetic + 0.3 * digit_judge {digit: 3}`."""
    if not terms:
        return "none"
    single = len(terms) == 1 and terms[0].weight == 1
    return " + ".join(("" if single else f"{term.weight:g} * ") + term.name + (f" {term.params}" if term.params else "")
                      for term in terms)


def check_matches(service: RewardService, reward: RewardConfig) -> None:
    """The run's reward must be the service's: its terms, and its held-out terms when it has
    some (a run without the guard may use a service that also has held-out terms)."""
    served, wanted = service.reward, reward
    if served.terms() != wanted.terms():
        raise RewardServiceError(
            f"reward.service: the service '{service.name}' scores {_describe(served.terms())} but the run's reward "
            f"is {_describe(wanted.terms())}; set the run's reward to the service's, or start a service with "
            f"the run's (`ddpo serve-rewards --config ... --name OTHER`)")
    if wanted.heldout and served.heldout != wanted.heldout:
        raise RewardServiceError(
            f"reward.heldout: the service '{service.name}' scores the held-out reward {_describe(served.heldout)} "
            f"but the run's is {_describe(wanted.heldout)}; set the run's reward.heldout to the service's, or "
            f"start a service with the run's")
    if served.frame_reduction != wanted.frame_reduction:
        raise RewardServiceError(
            f"reward.frame_reduction: the service '{service.name}' reduces a clip's frames by their "
            f"{served.frame_reduction} but the run's is {wanted.frame_reduction}; set the run's to the service's, "
            f"or start a service with the run's")


def connect_service(reward: RewardConfig) -> RewardService:
    """The service `reward.service` names, checked to score `reward`."""
    service = find_service(reward.service)
    check_matches(service, reward)
    return service
