"""Ctrl-C finishes the epoch under way and writes a checkpoint; resuming from it goes on to the
same result as a run that was never interrupted (lag 0: same LoRA bit for bit, same metrics)."""

import os
import signal
import subprocess
import sys
import time

from cluster.driver import Driver
from cluster.run_dir import latest_checkpoint
from ddpo.config import load_config
from tests.conftest import SMALL_DIGITS, SMALL_DIGITS_EPOCHS, assert_the_same_run, run_metrics

SMALL = [arg for key, value in SMALL_DIGITS.items() for arg in ("--set", f"{key}={value}")]
DDPO = [sys.executable, "-m", "cluster.cli", "train"]


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(ray_session, tmp_path, uninterrupted_digits):
    # Ctrl-C reaches the whole foreground process group, as in a terminal
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen([*DDPO, "--set", f"output_dir={tmp_path}", "--set", "run_name=interrupted", *SMALL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(run_metrics(interrupted)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is not None:
        out, err = proc.communicate()
        raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be interrupted:\n{out[-2000:]}\n{err[-4000:]}")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Ctrl-C: stopping after this epoch (Ctrl-C again to stop now)" in err
    assert f"go on with: ddpo train --resume {interrupted}" in out
    assert "\nTensorBoard: not served; add --tensorboard for the live curves of this run\n" in out
    checkpoints = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    assert checkpoints and checkpoints[-1] < f"epoch_{SMALL_DIGITS_EPOCHS - 1:04d}"  # it stopped before the end

    # what `ddpo train --resume` does (tests/test_job.py runs the command, as a job), here on this
    # process's Ray instance
    driver = Driver(load_config(interrupted / "config.yaml"), interrupted)
    try:
        start = driver.resume(latest_checkpoint(interrupted))
        assert start == int(checkpoints[-1].split("_")[1]) + 1
        driver.fit(start)
    finally:
        driver.shutdown()

    # Ctrl-C let the epoch under way finish: every epoch is there once
    assert_the_same_run(interrupted, uninterrupted_digits)


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
