"""The same classes composed in one process, without Ray (synchronous, lag 0 only).

Not a second runtime for users: it is the reference the Ray run must equal at
`max_policy_lag: 0` (tests/) and the yardstick of Ray's overhead (bench/throughput.py).
Same shape as `cluster.driver.Driver`: build the parts, then `fit()`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from actors.reward import RewardWorker
from actors.sampler import Sampler
from cluster.run_dir import RunRecorder, is_checkpoint_epoch
from ddpo.config import Config
from ddpo.plan import epoch_plan
from ddpo.trajectory import EpochTrajectories
from learner import Learner


class InProcessRun:
    def __init__(self, config: Config, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        self.prompts = config.load_prompts()
        self.learner = Learner(config)
        self.sampler = Sampler(config)
        self.reward = RewardWorker(config.reward)
        self.recorder = RunRecorder(run_dir)

    def fit(self) -> list[dict]:
        config, learner, sampler = self.config, self.learner, self.sampler
        sampler.set_weights(learner.weights())
        history = []
        for epoch in range(config.num_epochs):
            start = time.perf_counter()
            batches = [sampler.sample(spec.batch_id, spec.prompts, spec.seeds, spec.sde_start)
                       for spec in epoch_plan(config, self.prompts, epoch)]
            sampled = time.perf_counter()
            scored = [scored[1:] for scored in self.reward.score(*[summary for _, summary in batches])]
            rewarded = time.perf_counter()
            learner_metrics = learner.train(EpochTrajectories.from_batches([full for full, _ in batches]),
                                            [r for r, _ in scored])
            policy_version = learner_metrics.pop("policy_version")
            trained = time.perf_counter()
            sampler.set_weights(learner.weights())
            done = time.perf_counter()
            if is_checkpoint_epoch(config, epoch):
                learner.save_checkpoint(self.run_dir / "checkpoints")
            trajectories = [full for full, _ in batches] if config.save_latents else [s for _, s in batches]
            history.append(self.recorder.record_epoch(
                epoch, policy_version, pa.Table.from_batches(trajectories), scored,
                learner_metrics, dropped_stale=0,
                timings={"time_sample_s": sampled - start, "time_reward_s": rewarded - sampled,
                         "time_train_s": trained - rewarded, "time_broadcast_s": done - trained,
                         "time_epoch_s": done - start},
            ))
        self.recorder.close()
        return history
