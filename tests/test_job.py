"""`ray job submit` to a real head started with `ray start --head` on 127.0.0.1 (token auth on)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port, kill_leftovers

BIN = Path(sys.executable).parent


def _stop_session(leader_pid):
    """Stop every process of the head's session (gcs_server, raylet, dashboard, workers), and
    only those: `ray start` runs in a session of its own."""
    procs = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == leader_pid:
                procs.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    kill_leftovers(procs)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("head")
    dashboard_port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # the head's env runs the job
    log = open(tmp_path / "head.log", "w")
    temp_dir = tempfile.mkdtemp(prefix="ddpo-ray-")  # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(address, timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without the token: the server is up
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
                time.sleep(0.5)
        yield address, env
    finally:
        _stop_session(head.pid)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_job(address, env, *args):
    return subprocess.run([str(BIN / "ray"), "job", *args, "--address", address], capture_output=True,
                          text=True, timeout=120, env={**env, "RAY_AUTH_MODE": "token"})


def test_ray_job_submit_runs_the_tiny_run(ray_head, tmp_path):
    address, env = ray_head
    repo = Path(__file__).resolve().parents[1]
    output_dir = tmp_path / "runs"
    submitted = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait", "--submission-id", "ddpo-tiny",
         "--working-dir", str(repo), "--runtime-env-json",
         '{"excludes": [".venv", ".git", "runs", "__pycache__", "*.egg-info"]}',
         "--", "ddpo", "train", "--set", f"output_dir={output_dir}", "--set", "run_name=job",
         "--set", "num_epochs=2", "--set", "sample.num_steps=4", "--set", "sample.batch_size=4",
         "--set", "sample.num_batches_per_epoch=2", "--set", "train.batch_size=4"],
        capture_output=True, text=True, timeout=120, env={**env, "RAY_AUTH_MODE": "token"}, cwd=repo,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline = time.monotonic() + 300
    status = ""
    while time.monotonic() < deadline:
        status = _ray_job(address, env, "status", "ddpo-tiny").stdout.lower()
        if any(word in status for word in ("succeeded", "failed", "stopped")):
            break
        time.sleep(2)
    logs = _ray_job(address, env, "logs", "ddpo-tiny").stdout
    assert "job 'ddpo-tiny' succeeded" in status, status + logs[-3000:]
    assert f"run directory: {output_dir / 'job'}" in logs
    assert "reward_mean: epoch 0" in logs
    assert len((output_dir / "job" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (output_dir / "job" / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors").is_file()


def test_the_job_server_refuses_requests_without_the_token(ray_head):
    address, _ = ray_head
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=5)
    assert info.value.code == 401
