"""The DDPO loop shared by the Ray driver and the in-process run (cluster/loop.py), over stand-in
stages that log their calls and take known times: the stages' order, their timers, a stop, and
the summary line. No model, no Ray (the runs themselves: tests/test_system.py)."""

import time

import pytest

from cluster.loop import STAGES, EpochLoop, StageTimer
from cluster.metrics import stages_line
from tests.conftest import tiny_config

# each stage's stand-in takes this long (the record's: before it closes the timer)
SECONDS = {"sample": 0.02, "reward": 0.01, "train": 0.03, "sync": 0.005, "eval": 0.01, "checkpoint": 0.01,
           "record": 0.005}


class StandInRun(EpochLoop):
    """Stages that log themselves, sleep their SECONDS and return stand-ins; `stop_in` names a
    stage (and an epoch) during which a stop is asked for."""

    def __init__(self, tmp_path, stop_in: tuple[str, int] | None = None, **overrides):
        super().__init__(tiny_config(tmp_path, **overrides), tmp_path, recorder=None)
        self.calls, self.stop_in, self.epoch = [], stop_in, None

    def _stage(self, name: str) -> None:
        self.calls.append(name if name not in ("sample", "start_sampling") else (name, self.epoch))
        time.sleep(SECONDS.get(name, 0.0))
        if self.stop_in == (name, self.epoch):
            self.stop_requested.set()

    def sample(self, epoch):
        self.epoch = epoch
        self._stage("sample")
        return None if self.stop_requested.is_set() else [f"batch of epoch {epoch}"]

    def reward(self, batches):
        self._stage("reward")
        return None if self.stop_requested.is_set() else [1.0]

    def train(self, batches, scored):
        self._stage("train")
        self.policy_version += 1
        return {"loss": 0.0}

    def sync(self):
        self._stage("sync")

    def start_sampling(self, epoch):
        self.calls.append(("start_sampling", epoch))

    def evaluate(self, when):
        self._stage("eval")
        return {"eval_reward_mean": 1.0}

    def write_checkpoint(self, root):
        self._stage("checkpoint")
        return root / f"epoch_{self.policy_version - 1:04d}"

    def record(self, epoch, batches, scored, learner_metrics, timer):
        self._stage("record")
        metrics = {"epoch": epoch, "reward_mean": 1.0, "approx_kl": 0.0, **learner_metrics, **timer.close()}
        time.sleep(0.01)  # the metrics line and its plots, after the times are taken
        return metrics


def test_an_epoch_is_sample_reward_train_sync_checkpoint_record_each_timed(tmp_path):
    run = StandInRun(tmp_path, num_epochs=3, checkpoint_every=2, checkpoint_every_s=0, eval_images=4,
                     eval_every=2)
    start = time.perf_counter()
    history = run.fit()
    wall = time.perf_counter() - start
    epoch_1 = [("sample", 1), "reward", "train", "sync", "eval", ("start_sampling", 2), "checkpoint", "record"]
    # the first weights, the eval batch before training, the first epoch's sampling; the last
    # epoch's checkpoint; the eval batch after training
    assert run.calls == ["sync", "eval", ("start_sampling", 0),
                         ("sample", 0), "reward", "train", "sync", ("start_sampling", 1), "record",
                         *epoch_1,
                         ("sample", 2), "reward", "train", "sync", ("start_sampling", 3), "checkpoint", "record",
                         "eval"]
    assert [m["epoch"] for m in history] == [0, 1, 2] and run.completed and run.policy_version == 3
    for m in history:
        stages = [*STAGES, "eval"] if m["epoch"] == 1 else list(STAGES)
        assert sorted(k for k in m if k.startswith("time_")) == sorted(f"time_{s}_s" for s in [*stages, "epoch"])
        for stage in stages:  # each stage's own time, whether it ran (checkpoint: epochs 1 and 2) or not
            ran = stage != "checkpoint" or m["epoch"] > 0
            assert m[f"time_{stage}_s"] >= (SECONDS[stage] if ran else 0.0), (m["epoch"], stage)
        assert sum(m[f"time_{stage}_s"] for stage in stages) <= m["time_epoch_s"]
    assert history[1]["eval_reward_mean"] == 1.0 and "eval_reward_mean" not in history[0]
    # the epochs follow one another: epoch e+1 starts where e's times were taken, so its time
    # holds e's writes after that (10 ms here), and the epochs' times add up to the run's
    for before, after in zip(history, history[1:]):
        stages = sum(after[k] for k in after if k.startswith("time_") and k != "time_epoch_s")
        assert after["time_epoch_s"] - stages >= 0.01
    assert sum(m["time_epoch_s"] for m in history) <= wall
    line = stages_line(history)
    assert line.startswith("stages: sample ") and line.index(" train ") < line.index(" eval ") < line.index(" record ")


@pytest.mark.parametrize("stage", ["sample", "reward"])
def test_a_stop_while_an_epoch_is_sampled_drops_it(tmp_path, stage):
    """The Ray driver's sample and reward stages return None once a stop is asked for."""
    run = StandInRun(tmp_path, stop_in=(stage, 1), num_epochs=3)
    history = run.fit()
    assert [m["epoch"] for m in history] == [0]
    assert run.calls[-1] == (("sample", 1) if stage == "sample" else "reward")
    assert run.policy_version == 1 and not run.completed


def test_a_stop_during_the_update_finishes_the_epoch_and_samples_no_more(tmp_path):
    run = StandInRun(tmp_path, stop_in=("train", 1), num_epochs=3, checkpoint_every_s=0)
    history = run.fit()
    assert [m["epoch"] for m in history] == [0, 1]
    assert run.calls[-5:] == [("sample", 1), "reward", "train", "sync", "record"]  # no sampling of epoch 2
    assert not run.completed


def test_a_stage_timer_closed_mid_stage_counts_that_stage_so_far():
    timer = StageTimer()
    with timer("train"):
        time.sleep(0.01)
    with timer("record"):
        time.sleep(0.01)
        times = timer.close()
    assert times["time_train_s"] >= 0.01 and times["time_record_s"] >= 0.01
    assert times["time_train_s"] + times["time_record_s"] <= times["time_epoch_s"] == timer.ended - timer.started
    assert StageTimer(started=timer.ended).started == timer.ended  # the next epoch starts there


def test_the_stages_line_gives_each_stages_share_of_the_epochs():
    history = [{"time_sample_s": 4.0, "time_reward_s": 0.5, "time_train_s": 4.0, "time_sync_s": 0.2,
                "time_checkpoint_s": 0.1, "time_record_s": 0.2, "time_epoch_s": 10.0},
               {"time_sample_s": 4.2, "time_reward_s": 0.1, "time_train_s": 5.0, "time_sync_s": 0.2,
                "time_eval_s": 1.0, "time_checkpoint_s": 0.1, "time_record_s": 0.2, "time_epoch_s": 10.0}]
    assert stages_line(history) == ("stages: sample 41%, reward 3%, train 45%, sync 2%, eval 5%, checkpoint 1%, "
                                    "record 2% of the epoch time; the rest (1%) is the metrics lines and their plots")
