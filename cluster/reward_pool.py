"""The reward pool: M reward actors fed from one queue of sample batches.

- Batching across samplers: a free actor takes every batch that is waiting (up to
  `reward.max_batch_images` images, whole batches only) in one call.
- A call that raises or runs longer than `reward.timeout_s` is retried once on another actor
  (on the same one when it is the only actor and merely raised); a second failure ends the run
  with the reward's own error, or a timeout message naming the reward.
- An actor that dies is restarted by Ray, which reruns its call (`max_task_retries`); the pool
  only sees the call take longer.
- A batch is scored by the trained reward, or by the held-out one (`reward.heldout`, the
  eval batch's for the reward-hacking guard): a call takes batches of one kind only.
- The actors may be a reward service's (cluster/reward_service.py), shared by several runs: a
  call then also waits for the other runs' calls queued at its actor, and its time counts
  against `reward.timeout_s` all the same.

`ray.util.ActorPool` hands one item to one actor at a time and has no timeout or retry on
another actor, so the pool keeps its own small queue.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import ray

from rewards import RewardError


@dataclass
class Item:
    summary_ref: ray.ObjectRef
    num_images: int
    prompt_metadata: dict[str, dict]  # its prompts' metadata (a JSON Lines prompts file's)
    heldout: bool = False  # scored by the held-out reward (`reward.heldout`), not the trained one
    failed_on: list[int] = field(default_factory=list)  # actors a call with it failed on


class Scored(NamedTuple):
    """A batch's rewards, as the pool returns them."""
    batch_id: str
    rewards: np.ndarray
    info: dict[str, list]
    heldout: bool  # by the held-out reward


@dataclass
class Call:
    actor: int
    items: list[Item]
    started: float


class RewardPool:
    def __init__(self, actors: list, reward_name: str, max_batch_images: int, timeout_s: float,
                 actor_names: list[str] | None = None):
        self.actors = actors
        self.actor_names = actor_names or [f"reward-{i}" for i in range(len(actors))]  # for messages
        self.reward_name = reward_name
        self.max_batch_images = max_batch_images
        self.timeout_s = timeout_s
        self.idle = list(range(len(actors)))
        self.queue: deque[Item] = deque()
        self.running: dict[ray.ObjectRef, Call] = {}
        self.abandoned: dict[ray.ObjectRef, int] = {}  # timed-out calls still holding an actor

    def submit(self, summary_ref: ray.ObjectRef, num_images: int,
               prompt_metadata: dict[str, dict] | None = None, heldout: bool = False) -> None:
        self.queue.append(Item(summary_ref, num_images, prompt_metadata or {}, heldout))

    def score_all(self, batches: list[tuple[ray.ObjectRef, int, dict[str, dict]]],
                  heldout: bool = False) -> tuple[dict[str, tuple], dict[str, tuple]]:
        """Score every batch (summary_ref, num_images, prompt_metadata), and with `heldout` by
        the held-out reward too, waiting for all: ({batch_id: (rewards, info)} by the trained
        reward, the same by the held-out one). For a pool with nothing else to score."""
        assert not self.num_items, "score_all: the pool is scoring other batches"
        for kind in [False, True] if heldout else [False]:
            for summary_ref, num_images, prompt_metadata in batches:
                self.submit(summary_ref, num_images, prompt_metadata, heldout=kind)
        scored: dict[bool, dict[str, tuple]] = {False: {}, True: {}}
        while self.num_items:
            for result in self.poll():
                scored[result.heldout][result.batch_id] = (result.rewards, result.info)
        return scored[False], scored[True]

    @property
    def num_items(self) -> int:
        """Batches waiting for or inside a reward call."""
        return len(self.queue) + sum(len(call.items) for call in self.running.values())

    def _may_run(self, item: Item, actor: int) -> bool:
        return len(self.actors) == 1 or actor not in item.failed_on

    def _may_join(self, item: Item, first: Item, actor: int, num_images: int) -> bool:
        """Whether `item` may go into the call that `first` opens: the same reward, an actor it has
        not failed on, and room under `reward.max_batch_images`."""
        return (item.heldout == first.heldout and self._may_run(item, actor)
                and (item is first or num_images + item.num_images <= self.max_batch_images))

    def _dispatch(self) -> None:
        while self.queue and self.idle:
            actor = next((a for a in self.idle if self._may_run(self.queue[0], a)), None)
            if actor is None:
                return  # the first batch waits for an actor it has not failed on
            first, items, num_images = self.queue[0], [], 0
            while self.queue and self._may_join(self.queue[0], first, actor, num_images):
                item = self.queue.popleft()
                items.append(item)
                num_images += item.num_images
            self.idle.remove(actor)
            prompt_metadata = {prompt: metadata for item in items for prompt, metadata in item.prompt_metadata.items()}
            ref = self.actors[actor].score.remote(*[item.summary_ref for item in items], prompt_metadata=prompt_metadata,
                                                  heldout=first.heldout)
            self.running[ref] = Call(actor, items, time.monotonic())

    def _retry(self, call: Call, error: BaseException) -> None:
        for item in call.items:
            item.failed_on.append(call.actor)
            if len(item.failed_on) >= 2:
                raise error
        self.queue.extendleft(reversed(call.items))

    def poll(self, wake_on: list[ray.ObjectRef] = (), max_wait_s: float | None = None) -> list[Scored]:
        """Start calls for waiting batches, then block until a call finishes, one of `wake_on`
        (say, a sample batch being made) is ready, the nearest call deadline passes, or
        `max_wait_s` has gone by; return the scored batches of the calls that finished."""
        self._dispatch()
        refs = [*self.running, *self.abandoned]
        if not refs and not wake_on:
            return []
        deadline = min((call.started + self.timeout_s for call in self.running.values()), default=None)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if max_wait_s is not None:
            timeout = max_wait_s if timeout is None else min(timeout, max_wait_s)
        ready, _ = ray.wait([*refs, *wake_on], num_returns=1, timeout=timeout)
        ready = [ref for ref in ready if ref in self.running or ref in self.abandoned]
        scored = []
        for ref in ready:
            if ref in self.abandoned:  # its items were retried; the actor is free again
                self.idle.append(self.abandoned.pop(ref))
                continue
            call = self.running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                self.idle.append(call.actor)
                self._retry(call, err)
                continue
            self.idle.append(call.actor)
            scored.extend(Scored(batch_id, rewards, info, call.items[0].heldout) for batch_id, rewards, info in result)
        now = time.monotonic()
        for ref, call in list(self.running.items()):
            if now - call.started > self.timeout_s:
                del self.running[ref]
                self.abandoned[ref] = call.actor
                error = RewardError(f"reward '{self.reward_name}' took longer than reward.timeout_s = "
                                    f"{self.timeout_s:g} s, twice (on {self.actor_names[call.actor]} last)")
                if len(self.actors) == 1:
                    raise RewardError(f"reward '{self.reward_name}' took longer than reward.timeout_s = "
                                      f"{self.timeout_s:g} s on {self.actor_names[0]}, and there is no other "
                                      "reward actor to retry on")
                self._retry(call, error)
        self._dispatch()
        return scored
