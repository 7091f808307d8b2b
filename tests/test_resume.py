"""A stop signal (SIGTERM, Ctrl-C) stops a live local run at its next safe point with a
checkpoint; a second one ends it at once, and the run goes on from its last checkpoint by wall
time (`checkpoint_every_s`); resumed, it ends as a run never interrupted (lag 0: the same LoRA
bit for bit, the same metrics). tests/test_stop.py has the signal path without Ray,
tests/test_job.py `ray job stop`."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from cluster.driver import Driver
from cluster.run_dir import latest_checkpoint, resume_checkpoint
from ddpo.config import load_config
from tests.conftest import SMALL_DIGITS, SMALL_DIGITS_EPOCHS, assert_the_same_run, kill_leftovers, run_metrics

SMALL = [arg for key, value in SMALL_DIGITS.items() for arg in ("--set", f"{key}={value}")]
DDPO = [sys.executable, "-m", "cluster.cli", "train"]


def _session(leader: int) -> list[psutil.Process]:
    """The live processes of the session `leader` started (`start_new_session`): a `ddpo train`
    run's own, its local Ray instance's (its workers have process groups of their own)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == leader and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):  # ended meanwhile
            pass
    return found


def _title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # ended meanwhile
        return ""


def _wait_for(what: str, condition, deadline: float, running: subprocess.Popen | None = None,
              err: Path | None = None) -> None:
    """Poll `condition` until it holds; fail at `deadline`, or when `running` ends first."""
    while not condition():
        if time.monotonic() > deadline or (running is not None and running.poll() is not None):
            raise AssertionError(f"no {what} (exit {running and running.poll()}):\n"
                                 f"{err.read_text()[-3000:] if err else ''}")
        time.sleep(0.05)


def _ddpo_train(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """`ddpo train *args` in a session of its own, its stdout and stderr to files."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([*DDPO, *args], stdout=stdout, stderr=stderr, start_new_session=True)
    return proc, out, err


def _no_crash_lines(err: str, driver_only: bool = False) -> None:
    """None of what Ray's own SIGTERM handling prints (the C++ failure handler, a traceback).
    `driver_only`: in the driver's own lines, leaving out what Ray forwards from its workers
    (`(pid=...)`, `(raylet)`): a stop at once kills them mid-call, and one may abort as it goes."""
    if driver_only:
        err = "\n".join(line for line in err.splitlines() if not re.match(r"(\x1b\[\d+m)?\((pid=|raylet)", line))
    for sign in ("logging.cc", "SIGTERM received", "Traceback", "Aborted"):
        assert sign not in err, err[-3000:]


def test_stop_signals_leave_a_run_that_resumes_to_the_same_result(ray_session, tmp_path, uninterrupted_digits):
    """1. SIGTERM to the process group of a live local run, as `timeout`, systemd or a closed
       terminal send it (the run's Ray processes hold it, as they hold SIGINT, and end with
       the driver): the run stops at its next safe point, writes its checkpoint, prints the
       resume command and exits with 143, leaving no process behind.
    2. `ddpo train --resume`, with a checkpoint by wall time every epoch (`checkpoint_every_s`).
       Once one is past the first stage's, the learner rank freezes (SIGSTOP: an update or a
       checkpoint that does not end), then Ctrl-C, as a terminal sends it, and SIGTERM to the
       driver: the run ends at once, 143, with one line naming the last checkpoint, whole.
    3. Going on from there ends as the uninterrupted run, bit for bit, every epoch recorded
       once."""
    run_dir = tmp_path / "stopped"
    deadline = time.monotonic() + 300

    # 1. SIGTERM to the process group
    proc, out, err = _ddpo_train(tmp_path, "first", *SMALL, "--set", f"output_dir={tmp_path}",
                                 "--set", "run_name=stopped")
    try:
        _wait_for("second epoch", lambda: len(run_metrics(run_dir)) >= 2, deadline, proc, err)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, err.read_text()[-3000:]
        _wait_for("end of the run's processes", lambda: not _session(proc.pid), deadline)
    finally:
        kill_leftovers(_session(proc.pid), timeout=0)
    first = latest_checkpoint(run_dir)
    assert ("\nSIGTERM: stopping at the next safe point, with a checkpoint (SIGTERM again, or cluster.stop_grace_s = "
            "25 s from now, stops at once)\n") in err.read_text()
    # the driver's lines: in 1 of 3 fresh-clone runs a Ray worker process that held no actor (it
    # had not imported torch) aborted on the group's SIGTERM with abseil's "Mutex corrupt", which
    # is Ray's own and not the stop path's
    _no_crash_lines(err.read_text(), driver_only=True)
    lines = out.read_text().splitlines()
    assert "TensorBoard: not served; add --tensorboard for the live curves of this run" in lines
    assert lines[-1] == f"stopped by SIGTERM: checkpoint {first}; go on with: ddpo train --resume {run_dir}"
    assert first.name < f"epoch_{SMALL_DIGITS_EPOCHS - 2:04d}", first  # room for the second stage

    # 2. resumed, a checkpoint by time every epoch; the learner frozen, Ctrl-C, then SIGTERM
    proc, out, err = _ddpo_train(tmp_path, "second", "--resume", str(run_dir), "--set", "checkpoint_every_s=0.001")
    try:
        _wait_for("checkpoint by time", lambda: resume_checkpoint(run_dir) != first, deadline, proc, err)
        (learner,) = [p for p in _session(proc.pid) if _title(p).startswith("ray::WorkerActor")]
        learner.suspend()
        os.killpg(proc.pid, signal.SIGINT)
        _wait_for("Ctrl-C's line", lambda: "\nCtrl-C: stopping at the next safe point" in err.read_text(),
                  deadline, proc, err)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, err.read_text()[-3000:]
        _wait_for("end of the run's processes", lambda: not _session(proc.pid), deadline)
    finally:
        kill_leftovers(_session(proc.pid), timeout=0)
    last = resume_checkpoint(run_dir)
    assert f"resuming from {first} at epoch {int(first.name[6:]) + 1}" in out.read_text()
    assert err.read_text().splitlines()[-1] == (f"ddpo: stopped at once (SIGTERM again); go on from {last} with: "
                                                f"ddpo train --resume {run_dir}")
    _no_crash_lines(err.read_text(), driver_only=True)
    assert first.name < last.name < f"epoch_{SMALL_DIGITS_EPOCHS - 1:04d}"

    # 3. what `ddpo train --resume` does (tests/test_job.py runs the command, as a job), here on
    # this process's Ray instance
    driver = Driver(load_config(run_dir / "config.yaml"), run_dir)
    try:
        assert driver.resume(last) == int(last.name[6:]) + 1
        driver.fit(int(last.name[6:]) + 1)
    finally:
        driver.shutdown()
    assert_the_same_run(run_dir, uninterrupted_digits)


def test_resume_error_messages(tmp_path, capsys):
    from cluster.cli import main

    main(["train", "--resume", str(tmp_path / "nothing")])
    assert capsys.readouterr().err.strip() == (
        f"ddpo: error: --resume: '{tmp_path / 'nothing'}' is not a run directory (no config.yaml there)")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("num_epochs: 2\n")
    main(["train", "--resume", str(tmp_path / "run")])
    assert capsys.readouterr().err.strip() == f"ddpo: error: --resume: '{tmp_path / 'run'}' has no checkpoint to resume from"
    main(["train", "--resume", str(tmp_path / "run"), "--config", "x.yaml"])
    assert capsys.readouterr().err.strip().startswith("ddpo: error: --resume: the run's own config.yaml is used")
