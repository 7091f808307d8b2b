"""The stages of `cluster.loop` done by the plain classes in one process, without Ray
(synchronous, lag 0 only).

Not a second runtime for users: it is the reference the Ray run must equal at
`max_policy_lag: 0` (tests/) and the yardstick of Ray's overhead (bench/throughput.py). The loop,
the evaluation and the reward-hacking guard are the Ray driver's own (`cluster.loop.EpochLoop`).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from actors.reward import RewardWorker
from actors.sampler import Sampler
from cluster.loop import EpochLoop, StageTimer, with_scores
from cluster.run_dir import RunRecorder
from ddpo.config import Config
from ddpo.plan import epoch_plan, eval_plan
from ddpo.trajectory import EpochTrajectories
from learner import Learner

Batch = tuple[pa.RecordBatch, pa.RecordBatch]  # (the full trajectories, the rows without latents)


class InProcessRun(EpochLoop):
    def __init__(self, config: Config, run_dir: Path):
        super().__init__(config, run_dir, RunRecorder(run_dir))
        self.prompts = config.load_prompts()
        self.prompt_metadata = config.load_prompt_metadata()
        self.learner = Learner(config)
        self.sampler = Sampler(config)
        self.reward_worker = RewardWorker(config.reward)

    def fit(self, start_epoch: int = 0) -> list[dict]:
        try:
            return super().fit(start_epoch)
        finally:
            self.recorder.close()

    def metadata_of(self, prompts: list[str]) -> dict[str, dict]:
        """The metadata of these prompts that have some (a JSON Lines prompts file's), for the reward."""
        return {prompt: self.prompt_metadata[prompt] for prompt in prompts if prompt in self.prompt_metadata}

    def sample(self, epoch: int) -> list[Batch]:
        return [self.sampler.sample(spec.batch_id, spec.prompts, spec.seeds, spec.sde_start)
                for spec in epoch_plan(self.config, self.prompts, epoch)]

    def reward(self, batches: list[Batch]) -> list[tuple]:
        summaries = [summary for _, summary in batches]
        prompts = [prompt for summary in summaries for prompt in summary.column("prompt").to_pylist()]
        return [(rewards, info) for _, rewards, info in
                self.reward_worker.score(*summaries, prompt_metadata=self.metadata_of(prompts))]

    def train(self, batches: list[Batch], scored: list[tuple]) -> dict:
        learner_metrics = self.learner.train(EpochTrajectories.from_batches([full for full, _ in batches]),
                                             [rewards for rewards, _ in scored])
        self.policy_version = learner_metrics.pop("policy_version")
        return learner_metrics

    def sync(self) -> None:
        self.sampler.set_weights(self.learner.weights())

    def write_checkpoint(self, root: Path) -> Path | None:
        try:
            return self.learner.save_checkpoint(root)
        except OSError as err:
            raise self.write_failed("the checkpoint", err) from None

    def record(self, epoch: int, batches: list[Batch], scored: list[tuple], learner_metrics: dict,
               timer: StageTimer) -> dict:
        trajectories = [full if self.config.save_latents else summary for full, summary in batches]
        try:
            return self.recorder.record_epoch(epoch, self.policy_version, pa.Table.from_batches(trajectories),
                                              scored, learner_metrics, dropped_stale=0, timings=timer.close)
        except OSError as err:
            raise self.write_failed("the run directory", err) from None

    def eval_batch(self) -> pa.Table:
        spec = eval_plan(self.config, self.prompts)
        _, summary = self.sampler.sample(spec.batch_id, spec.prompts, spec.seeds, spec.sde_start)
        metadata = self.metadata_of(spec.prompts)

        def scored(heldout: bool) -> dict[str, tuple]:
            return {batch_id: (rewards, info) for batch_id, rewards, info in
                    self.reward_worker.score(summary, prompt_metadata=metadata, heldout=heldout)}

        return with_scores(summary, scored(False), scored(True) if self.config.reward.heldout else None)

    def roll_back_learner(self, checkpoint: Path, lr_factor: float) -> int:
        return self.learner.roll_back(checkpoint, lr_factor)
