"""Ctrl-C finishes the epoch under way and writes a checkpoint; `ddpo train --resume` goes on to
the same result as a run that was never interrupted (lag 0: same LoRA bit for bit, same metrics)."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

EPOCHS = 8
# one sampler and one learner: resuming a learner group is tests/test_learner_group.py's
SMALL = ["--set", f"num_epochs={EPOCHS}", "--set", "sample.num_steps=4", "--set", "sample.batch_size=4",
         "--set", "sample.num_batches_per_epoch=2", "--set", "train.batch_size=4",
         "--set", "cluster.num_samplers=1", "--set", "cluster.num_learners=1"]
DDPO = [sys.executable, "-m", "cluster.cli", "train"]


def _metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _lora(run_dir):
    return load_file(str(run_dir / "checkpoints" / f"epoch_{EPOCHS - 1:04d}" / "pytorch_lora_weights.safetensors"))


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path):
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
    checkpoints = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    assert checkpoints and checkpoints[-1] < f"epoch_{EPOCHS - 1:04d}"  # it stopped before the end

    resumed = subprocess.run([*DDPO, "--resume", str(interrupted)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {interrupted / 'checkpoints' / checkpoints[-1]}" in resumed.stdout

    full = subprocess.run([*DDPO, "--set", f"output_dir={tmp_path}", "--set", "run_name=full", *SMALL],
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]

    a, b = _lora(interrupted), _lora(tmp_path / "full")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    expected = {m["epoch"]: m for m in _metrics(tmp_path / "full")}
    got = _metrics(interrupted)
    # Ctrl-C let the epoch under way finish: every epoch is there once
    assert [m["epoch"] for m in got] == list(range(EPOCHS))
    for m in got:
        for key in ["reward_mean", "loss", "approx_kl", "clipfrac", "policy_version"]:
            assert m[key] == expected[m["epoch"]][key], (m["epoch"], key)


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


def test_a_killed_driver_leaves_a_checkpoint_no_older_than_the_interval(tmp_path):
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

    resumed = subprocess.run([*DDPO, "--resume", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted({m["epoch"] for m in _metrics(run_dir)}) == list(range(EPOCHS))


def _session_id(process):
    try:
        return os.getsid(process.pid)
    except OSError:
        return None
