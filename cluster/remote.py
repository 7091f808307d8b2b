"""The plain classes as Ray actors: the same methods, plus their busy time as metrics, plus
what only makes sense inside Ray (object refs in, torch threads from the layout, the learner
group's rendezvous). The reward actor lives here; the sampler and the learner, which need
diffusers and peft, in `cluster.remote_policy`: an actor's process imports the module of its
class, and importing this one takes 2.6 s against 6.2 s with them (here, on 2 cores).

And the one way in: `connect_ray` joins Ray (`ddpo train`, `ddpo eval`, `ddpo serve-rewards`),
`start_actor` starts an actor (the driver's, `ddpo eval`'s reward actors, a reward service's)."""

from __future__ import annotations

import os
import sys

import ray
import torch

from actors.reward import RewardWorker
from actors.usage import memory_bytes
from cluster import ACTOR_ENV
from cluster.metrics import ActorMetrics
from ddpo.config import RewardConfig
from ddpo.errors import AddressError, one_line
from rewards import RewardProcessDead

# `report` answers from its own thread, also while the actor is working
CONCURRENCY_GROUPS = {"report": 1}


def restart_options(max_restarts: int) -> dict:
    """A restartable actor also reruns the tasks it had in flight (at least once: batch ids
    keep a rerun from counting twice)."""
    return {"max_restarts": max_restarts, "max_task_retries": -1 if max_restarts else 0}


def start_actor(cls, *args, options: dict, num_threads: int, max_restarts: int = 0):
    """`cls(*args, num_threads)` as a Ray actor: with `options` (its resources or its bundle,
    its name), the actors' environment (ACTOR_ENV: the libraries quiet), its `report` thread
    (CONCURRENCY_GROUPS) and `max_restarts` restarts that rerun its calls in flight."""
    return ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(cls).options(
        **options, runtime_env={"env_vars": ACTOR_ENV}, **restart_options(max_restarts),
    ).remote(*args, num_threads)


def connect_ray(address: str | None, source: str, namespace: str, dashboard: bool = False, **init_kwargs):
    """Join Ray in `namespace`: a new local instance when `address` is None (every socket on
    loopback, `cluster.local`; its dashboard with `dashboard`), else the cluster at `address`
    (named by `source`, checked to answer already: `cluster.cli.ray_address`), where a port
    that answers but is no Ray cluster's is one line. Returns ray.init's context."""
    if address is None:
        from cluster.local import start_local_ray

        return start_local_ray(namespace=namespace, include_dashboard=dashboard, **init_kwargs)
    try:
        return ray.init(address=address, namespace=namespace, **init_kwargs)
    except ConnectionError as err:  # its port answered, but no Ray cluster there did
        raise AddressError(f"{source}: cannot reach a Ray cluster at {address} ({one_line(err)})") from None


def actor_metrics(*roles: str) -> dict[str, ActorMetrics]:
    """The busy time of each role the actor plays (a colocated worker samples and trains)."""
    name = ray.get_runtime_context().get_actor_name()
    return {role: ActorMetrics(name or role, role) for role in roles}


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

    @ray.method(concurrency_group="report")
    def report(self) -> dict:
        """Since the actor started: the seconds spent working in each role (its `working()`
        blocks), its memory (`actors.usage.memory_bytes`), and the denoiser's FLOPs with the
        device's peak FLOP/s (zero and None for an actor without a denoiser)."""
        meter = getattr(self, "flop_meter", None)
        return {"busy": {role: metrics.busy for role, metrics in self.metrics.items()}, **memory_bytes(),
                "flops": meter.total if meter else 0.0, "peak_flops": getattr(self, "peak_flops", None)}

    cls.__init__, cls.ready, cls.report = __init__, ready, report
    return cls


@keep_init_error
class RewardActor(RewardWorker):
    def __init__(self, reward: RewardConfig, num_threads: int):
        torch.set_num_threads(num_threads)
        super().__init__(reward)
        self.metrics = actor_metrics("reward")

    def score(self, *batches, prompt_metadata: dict[str, dict] | None = None, heldout: bool = False):
        with self.metrics["reward"].working():
            try:
                return super().score(*batches, prompt_metadata=prompt_metadata, heldout=heldout)
            except RewardProcessDead as err:
                print(f"reward actor exits to be restarted: {err}", file=sys.stderr, flush=True)
                os._exit(1)  # Ray restarts the actor (max_restarts) and reruns this call on it
