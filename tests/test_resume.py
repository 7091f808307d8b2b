"""Ctrl-C finishes the epoch under way and writes a checkpoint; `ddpo train --resume` goes on to
the same result as a run that was never interrupted (lag 0: same LoRA bit for bit, same metrics)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

EPOCHS = 8
# the embedded default, small; one sampler and one learner (resuming a learner group is
# tests/test_learner_group.py's), one torch thread each: the same numbers in a `ddpo train`
# process and in this one, whatever the cores
SETTINGS = {"num_epochs": EPOCHS, "sample.num_steps": 4, "sample.batch_size": 4, "sample.num_batches_per_epoch": 2,
            "train.batch_size": 4, "cluster.num_samplers": 1, "cluster.num_learners": 1,
            "cluster.sampler.num_threads": 1, "cluster.learner.num_threads": 1}
SMALL = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
DDPO = [sys.executable, "-m", "cluster.cli", "train"]


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory):
    """The run that nothing stopped, by the driver in this process (the Ray run is deterministic
    at lag 0, tests/test_system.py): the run directory."""
    from cluster.cli import embedded_config
    from cluster.driver import Driver
    from cluster.run_dir import make_run_dir
    from ddpo.config import load_config

    root = tmp_path_factory.mktemp("uninterrupted")
    config = load_config(embedded_config(), [f"{k}={v}" for k, v in
                                             {**SETTINGS, "output_dir": root, "run_name": "full"}.items()])
    driver = Driver(config, make_run_dir(config))
    try:
        driver.fit()
    finally:
        driver.shutdown()
    return root / "full"


def _metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _lora(run_dir):
    return load_file(str(run_dir / "checkpoints" / f"epoch_{EPOCHS - 1:04d}" / "pytorch_lora_weights.safetensors"))


def _assert_the_same_run(run_dir, reference):
    """The same final LoRA bit for bit and every epoch's metrics once, the same."""
    a, b = _lora(run_dir), _lora(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    expected = {m["epoch"]: m for m in _metrics(reference)}
    got = _metrics(run_dir)
    assert [m["epoch"] for m in got] == list(range(EPOCHS))
    for m in got:
        for key in ["reward_mean", "loss", "approx_kl", "clipfrac", "policy_version"]:
            assert m[key] == expected[m["epoch"]][key], (m["epoch"], key)


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    # Ctrl-C reaches the whole foreground process group, as in a terminal
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen([*DDPO, "--set", f"output_dir={tmp_path}", "--set", "run_name=interrupted", *SMALL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(_metrics(interrupted)) < 2 and proc.poll() is None and time.monotonic() < deadline:
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
    assert checkpoints and checkpoints[-1] < f"epoch_{EPOCHS - 1:04d}"  # it stopped before the end

    resumed = subprocess.run([*DDPO, "--resume", str(interrupted)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {interrupted / 'checkpoints' / checkpoints[-1]}" in resumed.stdout

    # Ctrl-C let the epoch under way finish: every epoch is there once
    _assert_the_same_run(interrupted, uninterrupted)


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


def test_a_killed_driver_leaves_a_checkpoint_no_older_than_the_interval(tmp_path, uninterrupted):
    import psutil

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([*DDPO, "--set", f"output_dir={tmp_path}", "--set", "run_name=killed",
                             "--set", "checkpoint_every=1", *SMALL],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(_metrics(run_dir)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    session = [p for p in psutil.process_iter() if _session_id(p) == proc.pid]  # the driver and its Ray
    proc.kill()  # SIGKILL to the driver alone: no handler runs
    proc.wait(timeout=30)
    for leftover in session:  # what the driver started, if it outlived the driver
        if leftover.is_running():
            leftover.kill()
    recorded = max(m["epoch"] for m in _metrics(run_dir))
    checkpointed = sorted(p.name for p in (run_dir / "checkpoints").glob("epoch_*"))
    assert checkpointed and int(checkpointed[-1].split("_")[1]) >= recorded  # nothing recorded is lost

    # `ddpo train --resume` does this (tested above): here in this process, on its Ray instance
    from cluster.driver import Driver
    from cluster.run_dir import latest_checkpoint, truncate_metrics
    from ddpo.config import load_config

    driver = Driver(load_config(run_dir / "config.yaml"), run_dir)
    try:
        start = driver.resume(latest_checkpoint(run_dir))
        truncate_metrics(run_dir, start)
        driver.fit(start)
    finally:
        driver.shutdown()
    _assert_the_same_run(run_dir, uninterrupted)


def _session_id(process):
    try:
        return os.getsid(process.pid)
    except OSError:
        return None
