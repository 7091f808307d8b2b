"""The reward pool's scheduling, with stand-in actors: batching across samplers, a retry on
another actor after an error or a timeout, the named failure after the second try, and the
held-out reward's batches in calls of their own."""

import time

import numpy as np
import pytest
import ray

from cluster.reward_pool import RewardPool
from rewards import RewardError


@ray.remote(num_cpus=0)
class StandInRewardActor:
    """Scores stand-in batches {"id", "n"}; raises or sleeps on request; logs its calls."""

    def __init__(self, raises: bool = False, sleep_s: float = 0.0):
        self.raises, self.sleep_s, self.calls = raises, sleep_s, []

    def score(self, *batches, prompt_metadata=None, heldout=False):
        self.calls.append([b["id"] + (" (held-out)" if heldout else "") for b in batches])
        time.sleep(self.sleep_s)
        if self.raises:
            raise RewardError("reward 'r' returned NaN or infinite rewards")
        return [(b["id"], np.full(b["n"], -1.0 if heldout else 1.0), {}) for b in batches]

    def log(self):
        return self.calls


def _run(pool, batches, deadline_s=20.0):
    ray.get([actor.__ray_ready__.remote() for actor in pool.actors])  # started, as in the driver
    scored, start = {}, time.monotonic()  # before the calls: none ends sooner than it sleeps
    for batch in batches:
        pool.submit(ray.put(batch), batch["n"])
    while len(scored) < len(batches):
        assert time.monotonic() - start < deadline_s
        for result in pool.poll():
            scored[result.batch_id] = result.rewards
    return scored, time.monotonic() - start


BATCHES = [{"id": f"b{i}", "n": 4} for i in range(3)]


def test_a_free_actor_takes_every_waiting_batch_up_to_the_image_limit(ray_session):
    actor = StandInRewardActor.remote()
    scored, _ = _run(RewardPool([actor], "r", max_batch_images=8, timeout_s=30), BATCHES)
    assert sorted(scored) == ["b0", "b1", "b2"]
    assert ray.get(actor.log.remote()) == [["b0", "b1"], ["b2"]]


def test_an_error_is_retried_once_on_another_actor(ray_session):
    broken, healthy = StandInRewardActor.remote(raises=True), StandInRewardActor.remote()
    scored, _ = _run(RewardPool([broken, healthy], "r", max_batch_images=4, timeout_s=30), BATCHES)
    assert sorted(scored) == ["b0", "b1", "b2"]
    broken_log, healthy_log = ray.get(broken.log.remote()), ray.get(healthy.log.remote())
    assert broken_log[0] == ["b0"]
    for batch_id in sum(broken_log, []):  # each batch that failed there went once to the other
        assert sum(broken_log, []).count(batch_id) == 1 and [batch_id] in healthy_log


def test_a_second_error_ends_the_run_with_the_rewards_own_message(ray_session):
    actors = [StandInRewardActor.remote(raises=True) for _ in range(2)]
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        _run(RewardPool(actors, "r", max_batch_images=4, timeout_s=30), BATCHES[:1])
    assert str(info.value.cause) == "reward 'r' returned NaN or infinite rewards"
    assert [ray.get(a.log.remote()) for a in actors] == [[["b0"]], [["b0"]]]


def test_a_call_past_the_timeout_is_retried_on_another_actor(ray_session):
    slow_s = 3.0
    slow, fast = StandInRewardActor.remote(sleep_s=slow_s), StandInRewardActor.remote()
    pool = RewardPool([slow, fast], "r", max_batch_images=4, timeout_s=0.5)
    scored, seconds = _run(pool, BATCHES[:1])
    assert list(scored) == ["b0"] and seconds < slow_s  # the slow call cannot end sooner: the retry's answer
    assert ray.get(fast.log.remote()) == [["b0"]]
    _run(pool, [{"id": "b1", "n": 4}])  # the slow actor comes back to the pool when it is done
    assert sorted(pool.idle) == [0, 1]


def test_a_timeout_with_no_other_actor_is_a_named_error(ray_session):
    pool = RewardPool([StandInRewardActor.remote(sleep_s=3.0)], "aesthetic", max_batch_images=4, timeout_s=0.5)
    with pytest.raises(RewardError, match=r"^reward 'aesthetic' took longer than reward.timeout_s = 0.5 s "
                                          "on reward-0, and there is no other reward actor to retry on$"):
        _run(pool, BATCHES[:1])


def test_the_held_out_reward_scores_in_calls_of_its_own_and_comes_back_apart(ray_session):
    """The eval batch, by the trained reward and by the held-out one (`reward.heldout`)."""
    actor = StandInRewardActor.remote()
    pool = RewardPool([actor], "r", max_batch_images=16, timeout_s=30)
    refs = [(ray.put(batch), batch["n"], {}) for batch in BATCHES[:2]]
    trained, heldout = pool.score_all(refs, heldout=True)
    assert {k: r.tolist() for k, (r, _) in trained.items()} == {"b0": [1.0] * 4, "b1": [1.0] * 4}
    assert {k: r.tolist() for k, (r, _) in heldout.items()} == {"b0": [-1.0] * 4, "b1": [-1.0] * 4}
    assert ray.get(actor.log.remote()) == [["b0", "b1"], ["b0 (held-out)", "b1 (held-out)"]]
    trained, heldout = pool.score_all(refs[:1])  # no held-out reward asked for
    assert list(trained) == ["b0"] and heldout == {}
