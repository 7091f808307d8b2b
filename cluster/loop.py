"""The DDPO loop, one for the Ray driver (`cluster.driver.Driver`) and for the in-process
reference run (`cluster.inprocess.InProcessRun`). An epoch is the paper's outer iteration:

    sample -> reward -> train -> sync -> (eval) -> checkpoint -> record

`EpochLoop.run_epoch` writes it so, each stage in one `StageTimer` block whose seconds go into
metrics.jsonl as `time_<stage>_s` (`time_eval_s` on the epochs that score the eval batch), with
the epoch's wall time as `time_epoch_s`. The runs differ only in how each stage is done: Ray
calls to the actors, or the plain classes called in this process. The evaluation, the
reward-hacking guard and the checkpoint schedule are the loop's, the same for both.

On Ray an epoch's sampling is under way before its sample stage (submitted at the sync before,
or epochs before at `cluster.max_policy_lag >= 1`), and the reward pool scores each batch as it
is made: `time_sample_s` is the sampling that held the epoch up, `time_reward_s` the scoring
left once the last batch was made. In process, each stage does all of its work itself.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from cluster.run_dir import RunRecorder, eval_metrics, is_checkpoint_epoch, resume_checkpoint, with_rewards
from ddpo.config import Config
from ddpo.errors import RunError
from ddpo.guard import Evaluation, HackingGuard

# the epoch's stages, in their order
STAGES = ("sample", "reward", "train", "sync", "checkpoint", "record")
# the same with the eval batch's where it runs, on the epochs that score it (`eval_every`)
TIMED_STAGES = ("sample", "reward", "train", "sync", "eval", "checkpoint", "record")

# the reward-hacking guard's rollbacks in a run: each halves the learning rate; after the last,
# the next time the guard fires it stops the run
MAX_ROLLBACKS = 3


class RolledBack(Exception):
    """The reward-hacking guard rolled the learner back to the best held-out checkpoint: the
    run goes on from `epoch`."""

    def __init__(self, epoch: int):
        super().__init__(epoch)
        self.epoch = epoch


class WriteFailed(RunError):
    """Writing the run directory failed mid-run (a full disk, say): the run stopped, and the
    checkpoints written before stay whole."""


class StageTimer:
    """The seconds of one epoch's stages: `with timer("train"): ...` adds the block's wall time
    to `time_train_s`. The epoch runs from `started` (where the previous one ended, so that the
    epochs' times add up to the run's) to `close()`."""

    def __init__(self, started: float | None = None):
        self.started = time.perf_counter() if started is None else started
        self.seconds: dict[str, float] = {}
        self.running: tuple[str, float] | None = None  # the stage under way, since when
        self.ended: float | None = None

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        self.running = (stage, start)
        try:
            yield
        finally:
            self.running = None
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def elapsed(self) -> float:
        """Seconds since the epoch started."""
        return time.perf_counter() - self.started

    def close(self) -> dict[str, float]:
        """End the epoch now: `time_<stage>_s` of each stage so far (the one under way up to
        now) and `time_epoch_s`. The next epoch starts here (`ended`)."""
        self.ended = time.perf_counter()
        seconds = dict(self.seconds)
        if self.running is not None:
            stage, start = self.running
            seconds[stage] = seconds.get(stage, 0.0) + self.ended - start
        return {**{f"time_{stage}_s": value for stage, value in seconds.items()},
                "time_epoch_s": self.ended - self.started}


def with_scores(batch: pa.RecordBatch, trained: dict[str, tuple], heldout: dict[str, tuple] | None = None) -> pa.Table:
    """A sample batch with its rewards (`reward`, `info.<key>`) from `trained`, and its held-out
    ones (`heldout`, `heldout_info.<key>`) from `heldout` when that holds them; both map a batch
    id to (rewards, info)."""
    batch_id = batch.column("batch_id")[0].as_py()
    table = with_rewards(pa.Table.from_batches([batch]), *trained[batch_id])
    return with_rewards(table, *heldout[batch_id], column="heldout") if heldout else table


class EpochLoop:
    """DDPO's loop over epochs (`fit`, `run_epoch`), its evaluation and its reward-hacking guard,
    over stages that a subclass supplies (the methods that raise NotImplementedError below)."""

    def __init__(self, config: Config, run_dir: Path, recorder: RunRecorder,
                 stop_requested: threading.Event | None = None):
        self.config = config
        self.run_dir = run_dir
        self.recorder = recorder
        # set by a stop signal (`ddpo train`: Ctrl-C, SIGTERM, SIGHUP): fit() returns at the next
        # safe point (see fit), and the caller writes the checkpoint
        self.stop_requested = stop_requested or threading.Event()
        self.policy_version = 0  # the learner's: the number of updates made
        self.completed = False  # fit() trained the last epoch
        self.epoch_start = time.perf_counter()  # where the next epoch's time starts
        self.last_checkpoint_at = time.monotonic()  # for `checkpoint_every_s`
        r = config.reward
        self.guard = HackingGuard(r.heldout_tolerance, r.heldout_patience) if r.heldout else None
        self.guard_stop: str | None = None  # the guard stopped the run: its line
        self.rollbacks = 0
        self.last_eval: tuple[int, pa.Table] | None = None  # (policy_version, the eval batch scored)

    # -- the loop -----------------------------------------------------------------------------

    def fit(self, start_epoch: int = 0) -> list[dict]:
        """Train from `start_epoch` to the end; returns the epochs' metrics. When a stop is asked
        for (`stop_requested`), it returns at the next safe point, where the learner's state
        and the run's record agree: at once while an epoch is sampled and scored (that epoch is
        dropped: a resume samples it again, the same batch ids and seeds), else after the
        update under way and its epoch's record. The checkpoint is the caller's to write."""
        config = self.config
        self.last_checkpoint_at, self.completed = time.monotonic(), False
        self.sync()
        if start_epoch == 0 and config.eval_images and not self.stop_requested.is_set():
            self.evaluate("before")
        self.go_on_from(start_epoch)
        self.epoch_start = time.perf_counter()
        history: list[dict] = []
        epoch = start_epoch
        with tqdm(desc="epochs", unit="epoch", initial=start_epoch, total=config.num_epochs) as epochs:
            while epoch < config.num_epochs and not self.stop_requested.is_set():
                try:
                    metrics = self.run_epoch(epoch)
                except Exception as err:
                    # the guard rolled back to its best checkpoint, or (on Ray) a learner rank
                    # died and its group started again from the latest checkpoint: go on from
                    # there. `recover` raises again what it cannot mend
                    epoch = err.epoch if isinstance(err, RolledBack) else self.recover(err)
                    history = [m for m in history if m["epoch"] < epoch]
                    epochs.n = epoch
                    epochs.refresh()
                    continue
                if metrics is None:  # stopped before the epoch's update
                    return history
                epochs.update()
                epochs.set_postfix(reward=f"{metrics['reward_mean']:.4f}", kl=f"{metrics['approx_kl'] or 0:.1e}")
                history.append(metrics)
                epoch += 1
                if self.guard_stop is not None:
                    break
        self.completed = epoch >= config.num_epochs
        if config.eval_images and not self.stop_requested.is_set():
            self.evaluate("after")
        return history

    def run_epoch(self, epoch: int) -> dict | None:
        """One epoch of DDPO; returns its metrics (None: a stop was asked for while it was
        sampled and scored, and it is dropped)."""
        timer = StageTimer(self.epoch_start)
        with timer("sample"):  # trajectories of the current policy (Ray: in flight since the last sync)
            batches = self.sample(epoch)
        if batches is None:
            return None
        with timer("reward"):  # Ray: what is left to score once the last batch is made
            scored = self.reward(batches)
        if scored is None:
            return None
        with timer("train"):  # advantages, then the policy-gradient update
            learner_metrics = self.train(batches, scored)
        with timer("sync"):  # the new weights to the samplers
            self.sync()
        if self.eval_due(epoch):
            with timer("eval"):  # the fixed eval batch; the guard may roll back (RolledBack)
                learner_metrics.update(self.evaluate_epoch(epoch))
        if not self.stop_requested.is_set():  # none after a stop: this epoch is the last
            self.start_sampling(epoch + 1)  # Ray: with the weights just synced, while this epoch is saved
        with timer("checkpoint"):  # before the record: a metrics line never runs ahead of its checkpoint
            if self.checkpoint_due(epoch):
                self.save_checkpoint()
        with timer("record"):
            # the record stage's time covers its work up to the metrics line, which holds the
            # times: the line and its plots fall in the next epoch's time_epoch_s, in no stage
            metrics = self.record(epoch, batches, scored, learner_metrics, timer)
        self.epoch_start = timer.ended
        return metrics

    # -- the stages: each run's own -----------------------------------------------------------

    def sample(self, epoch: int):
        """The epoch's sample batches (None: a stop was asked for meanwhile)."""
        raise NotImplementedError

    def reward(self, batches):
        """The batches' rewards (None: a stop was asked for meanwhile)."""
        raise NotImplementedError

    def train(self, batches, scored) -> dict:
        """One update on the batches and their rewards; sets `policy_version`; returns the
        learner's diagnostics."""
        raise NotImplementedError

    def sync(self) -> None:
        """Hand the learner's weights to the samplers."""
        raise NotImplementedError

    def start_sampling(self, epoch: int) -> None:
        """Start the sampling of the epochs up to `epoch + cluster.max_policy_lag` not started
        yet, with the weights synced last (a run that samples in its sample stage: nothing)."""

    def go_on_from(self, epoch: int) -> None:
        """Drop any sampling and scoring under way: the epochs from `epoch` on are sampled anew
        (the same batch ids and seeds), starting now."""
        self.start_sampling(epoch)

    def write_checkpoint(self, root: Path) -> Path | None:
        """The learner's checkpoint of its policy version, written under `root`."""
        raise NotImplementedError

    def record(self, epoch: int, batches, scored, learner_metrics: dict, timer: StageTimer) -> dict:
        """Write the epoch into the run directory, its times `timer.close()`; return its metrics."""
        raise NotImplementedError

    def eval_batch(self) -> pa.Table:
        """The fixed eval batch (`ddpo.plan.eval_plan`) sampled with the current weights, scored
        by the trained reward and by the held-out one (`reward.heldout`): `with_scores`."""
        raise NotImplementedError

    def roll_back_learner(self, checkpoint: Path, lr_factor: float) -> int:
        """Load `checkpoint` into the learner, its learning rate times `lr_factor` from now on;
        returns its policy version."""
        raise NotImplementedError

    def recover(self, err: Exception) -> int:
        """After `err` in an epoch: the epoch to go on from, once mended; raises `err` when it
        cannot be mended."""
        raise err

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint_due(self, epoch: int) -> bool:
        """`checkpoint_every` epochs, the last epoch, or `checkpoint_every_s` seconds since the
        last checkpoint."""
        every_s = self.config.checkpoint_every_s
        return (is_checkpoint_epoch(self.config, epoch)
                or (every_s > 0 and time.monotonic() - self.last_checkpoint_at >= every_s))

    def save_checkpoint(self) -> Path | None:
        saved = self.write_checkpoint(self.run_dir / "checkpoints")
        self.last_checkpoint_at = time.monotonic()
        return saved

    def resume_hint(self) -> str:
        """Where the run can go on from."""
        checkpoint = resume_checkpoint(self.run_dir)
        return (f"go on from {checkpoint} with: ddpo train --resume {self.run_dir}" if checkpoint
                else "no checkpoint was written yet (see checkpoint_every)")

    def write_failed(self, what: str, err: OSError) -> WriteFailed:
        """One line for a failed write of the run directory: `what` failed with `err`."""
        return WriteFailed(f"writing {what} failed ({err}); the run stopped; {self.resume_hint()}")

    # -- evaluation and the reward-hacking guard ----------------------------------------------

    def eval_due(self, epoch: int) -> bool:
        config = self.config
        return bool(config.eval_every and (epoch + 1) % config.eval_every == 0 and config.eval_images)

    def evaluate(self, when: str) -> dict[str, float]:
        """Sample and score the fixed eval batch with the current weights, by the trained reward
        and the held-out one (`reward.heldout`), and record it as `samples/eval_<when>.parquet`;
        returns its `eval_metrics`. The batch of this very policy version is not sampled twice."""
        if self.last_eval is not None and self.last_eval[0] == self.policy_version:
            table = self.last_eval[1]
        else:
            table = self.eval_batch()
            self.last_eval = (self.policy_version, table)
        self.recorder.record_eval(when, self.policy_version, table)
        return eval_metrics(table)

    def evaluate_epoch(self, epoch: int) -> dict:
        """The eval batch after this epoch's update, given to the guard (if any): its metrics,
        and `heldout_guard`, the guard's action, when it fired."""
        evaluated: dict = self.evaluate(f"epoch_{epoch:04d}")
        action = self.guard_against_hacking(epoch, evaluated) if self.guard is not None else None
        if action is not None:
            evaluated["heldout_guard"] = action
        return evaluated

    def guard_against_hacking(self, epoch: int, metrics: dict[str, float]) -> str | None:
        """Give the guard this epoch's evaluation (`ddpo.guard`): keep `checkpoints/best` at the
        best held-out one, and when the guard fires, warn, stop or roll back
        (`reward.heldout_action`). Returns the action taken, if any."""
        evaluation = Evaluation(epoch, metrics["eval_reward_mean"], metrics["heldout_reward_mean"])
        is_best, fired = self.guard.observe(evaluation)
        if is_best:
            self.save_best()
        if not fired:
            return None
        action = self.config.reward.heldout_action
        if action == "rollback" and self.rollbacks >= MAX_ROLLBACKS:
            action = "stop"
        best = self.run_dir / "checkpoints" / "best"
        line = (f"{self.guard.warning(evaluation, ' + '.join(t.name for t in self.config.reward.heldout))}; "
                f"best held-out checkpoint: {best} (epoch {self.guard.best.epoch})")
        line += {"warn": "; training goes on (reward.heldout_action: warn)",
                 "stop": "; the run stops here",
                 "rollback": "; rolling back to it at half the learning rate"}[action]
        print(line, file=sys.stderr, flush=True)
        with open(self.run_dir / "guard.jsonl", "a") as f:  # kept across rollbacks, which cut metrics.jsonl
            f.write(json.dumps({"epoch": epoch, "action": action, **vars(evaluation),
                                "best": vars(self.guard.best)}) + "\n")
        if action == "stop":
            self.guard_stop = line
        elif action == "rollback":
            raise RolledBack(self.roll_back(best))
        return action

    def save_best(self) -> None:
        """`checkpoints/best`: a copy of this epoch's checkpoint (written now if not yet), made
        whole before it replaces the last best."""
        saved = self.save_checkpoint()
        root = self.run_dir / "checkpoints"
        partial, best = root / ".best.partial", root / "best"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            shutil.copytree(saved, partial)
            shutil.rmtree(best, ignore_errors=True)
            partial.rename(best)
        except OSError as err:
            raise self.write_failed("the best checkpoint", err) from None

    def roll_back(self, best: Path) -> int:
        """Load `best` into the learner at half the learning rate; the epochs after it are redone
        (their checkpoints move to `checkpoints/rolled_back_<n>/`, out of a resume's way, and
        their metrics are cut). Returns the epoch to go on from."""
        self.rollbacks += 1
        self.guard.streak = 0  # a streak counts from the weights rolled back to
        self.policy_version = self.roll_back_learner(best, 0.5)
        root = self.run_dir / "checkpoints"
        for path in root.glob("epoch_*"):
            if int(path.name.removeprefix("epoch_")) >= self.policy_version:
                (root / f"rolled_back_{self.rollbacks}").mkdir(exist_ok=True)
                path.rename(root / f"rolled_back_{self.rollbacks}" / path.name)
        self.recorder.restart_at(self.policy_version)
        self.last_eval = None  # its version number comes again, with other weights
        self.sync()
        self.go_on_from(self.policy_version)  # sampled with the weights rolled back from: dropped
        self.epoch_start = time.perf_counter()
        return self.policy_version

