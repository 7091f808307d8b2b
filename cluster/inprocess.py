"""The same classes composed in one process, without Ray (synchronous, lag 0 only).

Not a second runtime for users: it is the reference the Ray run must equal at
`max_policy_lag: 0` (tests/) and the yardstick of Ray's overhead (bench/throughput.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from actors.reward import RewardWorker
from actors.sampler import Sampler
from cluster.run_dir import checkpoint_dir, is_checkpoint_epoch, record_epoch
from ddpo.config import Config
from ddpo.plan import epoch_plan
from learner import Learner


def run_inprocess(config: Config, run_dir: Path) -> tuple[list[dict], Learner]:
    """Run `config` with one sampler, one reward worker and the learner in this process;
    writes the same run directory as the Ray driver. Returns the metrics and the learner."""
    prompts = config.load_prompts()
    learner = Learner(config)
    sampler = Sampler(config)
    reward = RewardWorker(config.reward.name)
    sampler.set_weights(learner.weights())
    history = []
    for epoch in range(config.num_epochs):
        start = time.perf_counter()
        batches = [sampler.sample(spec.batch_id, spec.prompts, spec.seeds)
                   for spec in epoch_plan(config, prompts, epoch)]
        sampled = time.perf_counter()
        scored = [reward.score(summary)[1:] for _, summary in batches]
        rewarded = time.perf_counter()
        learner_metrics = learner.train([full for full, _ in batches], [r for r, _ in scored])
        trained = time.perf_counter()
        sampler.set_weights(learner.weights())
        done = time.perf_counter()
        trajectories = [full for full, _ in batches] if config.save_latents else [s for _, s in batches]
        history.append(record_epoch(
            run_dir, epoch, learner.policy_version, pa.Table.from_batches(trajectories), scored,
            learner_metrics, dropped_stale=0,
            timings={"time_sample_s": sampled - start, "time_reward_s": rewarded - sampled,
                     "time_train_s": trained - rewarded, "time_broadcast_s": done - trained,
                     "time_epoch_s": done - start},
        ))
        if is_checkpoint_epoch(config, epoch):
            learner.save_checkpoint(checkpoint_dir(run_dir, epoch))
    return history, learner
