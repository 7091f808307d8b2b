"""A stop signal's one path (`cluster.cli.GracefulStop`) without Ray: the first signal asks for
a stop, a second one or `cluster.stop_grace_s` running out ends the process at once with one
line naming the checkpoint to go on from; what a stop leaves behind is a run that resumes (a
checkpoint write killed half-way, a metrics line cut short, a checkpoint ahead of the record).
The runs stopped for real are in tests/test_resume.py (local) and tests/test_job.py (`ray job
stop`)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.cli import STOP_MARGIN_S, job_stop_wait_note
from cluster.driver import Driver
from cluster.run_dir import latest_checkpoint, read_metrics, resume_checkpoint, truncate_metrics
from ddpo.config import save_config
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]

# a process that asks for a stop on a signal and never reaches a safe point (a checkpoint that
# does not end): what ends it is the second signal or the grace period
NEVER_SAFE = """
import sys, time
from pathlib import Path

import cluster.run_dir  # imported before, as in `ddpo train`
from cluster.cli import GracefulStop

stop = GracefulStop(Path(sys.argv[1]), float(sys.argv[2]))
stop.install()
print("ready", flush=True)
stop.requested.wait()
print("requested", flush=True)
time.sleep(600)
"""


def _never_safe(run_dir: Path, grace_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", NEVER_SAFE, str(run_dir), str(grace_s)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n", proc.communicate()
    return proc


def _run_dir(tmp_path: Path, checkpoints: list[int], recorded: int) -> Path:
    """A run directory with whole checkpoints of `checkpoints`' epochs and `recorded` metrics lines."""
    run_dir = tmp_path / "run"
    for epoch in checkpoints:
        (run_dir / "checkpoints" / f"epoch_{epoch:04d}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"epoch_{epoch:04d}" / "learner_state.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(recorded)))
    return run_dir


@pytest.mark.parametrize("signum, name, status", [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "Ctrl-C", 130),
                                                  (signal.SIGHUP, "SIGHUP", 129)])
def test_a_second_signal_ends_at_once_naming_the_checkpoint(tmp_path, signum, name, status):
    run_dir = _run_dir(tmp_path, [0, 2], recorded=3)
    (run_dir / "checkpoints" / ".epoch_0003.partial").mkdir()  # a write cut short: not a checkpoint
    proc = _never_safe(run_dir, 60)
    try:
        proc.send_signal(signum)
        assert proc.stdout.readline() == "requested\n"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == status, err
    assert err.splitlines()[-3:] == [
        f"{name}: stopping at the next safe point, with a checkpoint ({name} again, or cluster.stop_grace_s = 60 s "
        "from now, stops at once)",
        "",
        f"ddpo: stopped at once ({name} again); go on from {run_dir / 'checkpoints' / 'epoch_0002'} with: "
        f"ddpo train --resume {run_dir}"]


def test_the_grace_period_running_out_ends_at_once(tmp_path):
    proc = _never_safe(tmp_path / "run", 0.5)
    try:
        start = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 129 and time.monotonic() - start < 10, err
    assert err.splitlines()[-1] == ("ddpo: stopped at once (cluster.stop_grace_s = 0.5 s ran out); no checkpoint "
                                    "was written (see checkpoint_every_s)")


def test_a_resume_goes_on_from_the_latest_checkpoint_its_record_holds(tmp_path):
    """Killed between a checkpoint and its epoch's metrics line (SIGKILL, an OOM, a stop at
    once), going on from that checkpoint would leave the epoch out of metrics.jsonl for good."""
    run_dir = _run_dir(tmp_path, [1, 3, 4], recorded=4)  # epoch 4's checkpoint, not its line
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "rew')  # and its line cut short
    assert latest_checkpoint(run_dir).name == "epoch_0004"
    assert resume_checkpoint(run_dir).name == "epoch_0003"
    assert [m["epoch"] for m in read_metrics(run_dir)] == [0, 1, 2, 3]
    truncate_metrics(run_dir, 2)
    assert (run_dir / "metrics.jsonl").read_text() == '{"epoch": 0}\n{"epoch": 1}\n'
    (run_dir / "metrics.jsonl").unlink()  # no record to go by: the latest
    assert resume_checkpoint(run_dir).name == "epoch_0004"
    assert resume_checkpoint(tmp_path / "nothing") is None


def test_checkpoints_by_wall_time(tmp_path):
    driver = Driver.__new__(Driver)  # its checkpoint schedule alone, no actors
    driver.config = tiny_config(tmp_path, num_epochs=10, checkpoint_every=4, checkpoint_every_s=600)
    driver.last_checkpoint_at = time.monotonic()
    assert [e for e in range(10) if driver.checkpoint_due(e)] == [3, 7, 9]  # every 4 epochs, and the last
    driver.last_checkpoint_at = time.monotonic() - 600
    assert driver.checkpoint_due(0)
    driver.config.checkpoint_every_s = 0  # none by time
    assert not driver.checkpoint_due(0)


def test_a_job_is_told_when_ray_job_stop_would_cut_its_checkpoint_short(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_stop_wait_note(25) is None  # not a job
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.delenv("RAY_JOB_STOP_WAIT_TIME_S", raising=False)
    needed = 25 + STOP_MARGIN_S
    assert job_stop_wait_note(25) == (
        "note: `ray job stop` kills this job 3 s after its SIGTERM (RAY_JOB_STOP_WAIT_TIME_S), within "
        "cluster.stop_grace_s = 25 s: a stop may not reach its checkpoint; submit with "
        f"--runtime-env-json '{{\"env_vars\": {{\"RAY_JOB_STOP_WAIT_TIME_S\": \"{needed}\"}}}}'")
    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", str(needed))
    assert job_stop_wait_note(25) is None


# a learner whose checkpoint write stops half-way (its state file partly written), until killed
KILLED_MID_WRITE = """
import sys
from pathlib import Path

import learner.learner as module
from ddpo.config import load_config
from learner import Learner

learner, root = Learner(load_config(sys.argv[1])), Path(sys.argv[2])
learner.policy_version = 1
learner.save_checkpoint(root)


def stuck(tensors, path):
    with open(path, "wb") as f:
        f.write(b"\\0" * 100)
    print("writing", flush=True)
    sys.stdin.read()


module.save_file = stuck
learner.policy_version = 2
learner.save_checkpoint(root)
"""


def test_a_checkpoint_write_killed_half_way_leaves_the_one_before_whole(tmp_path):
    """What a stop at once does to a learner writing a checkpoint (its process is killed with
    the run's): the folder written aside stays behind, is never taken for a checkpoint, and the
    next write clears it."""
    from learner import Learner

    config = tiny_config(tmp_path)
    save_config(config, tmp_path / "config.yaml")
    root = tmp_path / "run" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path / "config.yaml"), str(root)],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline() == "writing\n", proc.communicate()
    finally:
        proc.kill()
        proc.communicate()
    assert sorted(p.name for p in root.iterdir()) == [".epoch_0001.partial", "epoch_0000"]
    assert latest_checkpoint(tmp_path / "run") == resume_checkpoint(tmp_path / "run") == root / "epoch_0000"
    learner = Learner(config)
    assert learner.load_checkpoint(root / "epoch_0000") == 1
    learner.policy_version = 2
    assert learner.save_checkpoint(root) == root / "epoch_0001"
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0000", "epoch_0001"]
