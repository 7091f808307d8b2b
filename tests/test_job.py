"""`ray job submit` to a real head started with `ray start --head` (token auth on): a job whose
driver dies goes on as a new job with `--resume`, a second node that dies has its actors'
bundles moved to the head, and a job stopped with `ray job stop` checkpoints and goes on as a new
job to the same result."""

import json
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

from cluster.run_dir import latest_checkpoint
from tests.conftest import SMALL_DIGITS, SMALL_DIGITS_EPOCHS, assert_the_same_run, free_port, kill_leftovers, run_metrics

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _session_id(process):
    try:
        return os.getsid(process.pid)
    except (ProcessLookupError, PermissionError, psutil.Error):
        return None


def _stop_session(leader_pid):
    """Stop every process of the head's session (gcs_server, raylet, dashboard, workers), and
    only those: `ray start` runs in a session of its own."""
    procs = [p for p in psutil.process_iter() if _session_id(p) == leader_pid]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    kill_leftovers(procs)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head with 4 CPUs whose GCS declares a node dead after about 1.5 s without an answer:
    (dashboard URL, environment, GCS address)."""
    tmp_path = tmp_path_factory.mktemp("head")
    dashboard_port, gcs_port = free_port(), free_port()
    # the head's env runs the job; token authentication named: a joining node sends the token only then
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    log = open(tmp_path / "head.log", "w")
    temp_dir = tempfile.mkdtemp(prefix="ddpo-ray-")  # short: Ray's socket paths must fit in 107 bytes
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_timeout_ms": 500,
              "health_check_failure_threshold": 3}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={temp_dir}", f"--system-config={json.dumps(health)}"],
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
        yield address, env, f"127.0.0.1:{gcs_port}"
    finally:
        _stop_session(head.pid)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(env, *args, timeout=120):
    """A `ray` command with the token sent; its stdout."""
    done = subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _submit(address, env, submission_id, *entrypoint, options=()):
    """`ray job submit` of `entrypoint`, as a user submits it, not waiting for it."""
    _ray(env, "job", "submit", "--address", address, "--no-wait", "--submission-id", submission_id, *options,
         "--", *entrypoint)


def _api(address, path, method="GET"):
    """The head's HTTP API with the token (what `ray job status`, `ray list` ... ask, without a
    Python process started per question)."""
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(f"{address}{path}", method=method, headers={"authorization": f"Bearer {token}"})
    return json.load(urllib.request.urlopen(request, timeout=30))


def _status(address, submission_id):
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return _api(address, f"/api/jobs/{submission_id}")["status"]


def _ended(address, submission_id):
    return _status(address, submission_id) not in ("PENDING", "RUNNING")


def _logs(address, submission_id):
    return _api(address, f"/api/jobs/{submission_id}/logs")["logs"]


def _state(address, what):
    """The cluster's nodes, actors ... as the state API lists them."""
    return _api(address, f"/api/v0/{what}?detail=1&limit=10000")["data"]["result"]["result"]


def _wait_for(what, condition, deadline):
    while not condition():
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.2)


def _train(output_dir, run_name, **settings):
    """`ddpo train` of the small digits run (the repository as the job's working directory)."""
    settings = {**SMALL_DIGITS, "output_dir": output_dir, "run_name": run_name, **settings}
    return ["ddpo", "train", *(arg for key, value in settings.items() for arg in ("--set", f"{key}={value}"))]


WORKING_DIR = ["--working-dir", str(REPO), "--runtime-env-json",
               '{"excludes": [".venv", ".git", "runs", "__pycache__", "*.egg-info"]}']


def test_a_job_whose_driver_dies_resumes_as_a_new_job_and_survives_a_lost_node(ray_head, tmp_path,
                                                                                 uninterrupted_digits):
    """Two faults of a `ray job submit` run, and the run ends as the uninterrupted one, bit for bit.

    A second node B (`ray start --address`, custom resource `ddpo_node_b`) holds both samplers
    and the reward actor: the head's other CPUs are held by a blocker job meanwhile, and the
    learner asks for the head (`node:__internal_head__`).
    1. The job's driver is SIGKILLed after epoch 1 (its actors go with it). `ddpo train --resume
       RUN_DIR`, submitted as a new job, goes on from the last checkpoint.
    2. One epoch into the resumed job, node B is SIGKILLed whole (its raylet, its agents, its
       workers) and the blocker job stops. Ray's GCS marks the node dead and reschedules the
       placement group's bundles of that node onto the head, and the sampler and reward actors
       in them restart there (`max_restarts`) and rerun their tasks."""
    address, env, gcs = ray_head
    node_b = subprocess.Popen(
        [str(BIN / "ray"), "start", f"--address={gcs}", "--num-cpus=3", '--resources={"ddpo_node_b": 1}', "--block",
         "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}"],
        stdout=(tmp_path / "node_b.log").open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300

        def nodes():
            return {n["node_id"]: n for n in _state(address, "nodes") if n["state"] == "ALIVE"}

        def actors(submission_id):
            job_id = _api(address, f"/api/jobs/{submission_id}")["job_id"]
            return {a["name"]: a for a in _state(address, "actors")
                    if a["job_id"] == job_id and a["name"] in ("sampler-0", "sampler-1", "reward-0", "learner-0")}

        _wait_for("node B", lambda: len(nodes()) == 2, deadline)
        (b_id,) = [i for i, n in nodes().items() if "ddpo_node_b" in n["resources_total"]]
        _submit(address, env, "blocker", "python", "-c", "import time; time.sleep(600)",
                options=["--entrypoint-num-cpus", "3", "--entrypoint-resources", '{"node:__internal_head__": 0.01}'])
        _wait_for("running blocker", lambda: _status(address, "blocker") == "RUNNING", deadline)

        # 1. the driver dies
        run_dir = tmp_path / "runs" / "job"
        _submit(address, env, "ddpo-job", *_train(
            tmp_path / "runs", "job", **{"checkpoint_every": 1, "cluster.layout": "separate",
                                         "cluster.num_samplers": 2, "cluster.sampler.num_cpus": 1,
                                         "cluster.reward.num_cpus": 1, "cluster.learner.num_cpus": 1,
                                         "cluster.learner.resources": '{"node:__internal_head__": 0.001}'}),
                options=WORKING_DIR)
        _wait_for("second epoch", lambda: len(run_metrics(run_dir)) >= 2 or _ended(address, "ddpo-job"), deadline)
        placed = {name: actor["node_id"] == b_id for name, actor in actors("ddpo-job").items()
                  if actor["state"] == "ALIVE"}
        drivers = [p for p in psutil.process_iter(["cmdline"]) if f"output_dir={tmp_path / 'runs'}" in " ".join(p.info["cmdline"] or [])]
        for driver in drivers:  # SIGKILL: none of the driver's handlers runs
            driver.kill()
        assert placed == {"sampler-0": True, "sampler-1": True, "reward-0": True, "learner-0": False}, placed
        assert drivers, _logs(address, "ddpo-job")[-3000:]
        _wait_for("failed job", lambda: _ended(address, "ddpo-job"), deadline)
        assert _status(address, "ddpo-job") == "FAILED"
        recorded = max(m["epoch"] for m in run_metrics(run_dir))
        checkpointed = sorted(p.name for p in (run_dir / "checkpoints").glob("epoch_*"))
        assert recorded < SMALL_DIGITS_EPOCHS - 2, "the run was too far on when its driver was killed"
        assert checkpointed and int(checkpointed[-1].split("_")[1]) >= recorded  # nothing recorded is lost

        # 2. the resumed job loses node B
        _submit(address, env, "ddpo-job-resumed", "ddpo", "train", "--resume", str(run_dir))
        _wait_for("a resumed epoch", lambda: max(m["epoch"] for m in run_metrics(run_dir)) > recorded
                  or _ended(address, "ddpo-job-resumed"), deadline)
        for proc in [p for p in psutil.process_iter() if _session_id(p) == node_b.pid]:
            proc.kill()
        _api(address, "/api/jobs/blocker/stop", method="POST")
        _wait_for("end of the resumed job", lambda: _ended(address, "ddpo-job-resumed"), deadline)
        logs = _logs(address, "ddpo-job-resumed")
        assert _status(address, "ddpo-job-resumed") == "SUCCEEDED", logs[-3000:]
        assert f"run directory: {run_dir}" in logs
        assert f"resuming from {run_dir / 'checkpoints' / checkpointed[-1]} at epoch {recorded + 1}" in logs
        assert b_id not in nodes()
        moved = {name: (actor["node_id"] != b_id, actor["num_restarts"])
                 for name, actor in actors("ddpo-job-resumed").items() if name != "learner-0"}
        assert moved == {"sampler-0": (True, "1"), "sampler-1": (True, "1"), "reward-0": (True, "1")}, moved
        assert [m["num_samples"] for m in run_metrics(run_dir)] == [8] * SMALL_DIGITS_EPOCHS
        assert all(m["duplicate_batches"] == 0 and m["learner_restarts"] == 0 for m in run_metrics(run_dir))
        assert_the_same_run(run_dir, uninterrupted_digits)
    finally:
        _stop_session(node_b.pid)


def test_ray_job_stop_checkpoints_and_the_job_resubmitted_with_resume_ends_the_same(ray_head, tmp_path,
                                                                                    uninterrupted_digits):
    """`ray job stop` sends the job's driver SIGTERM, and SIGKILL RAY_JOB_STOP_WAIT_TIME_S later
    (given in the job's runtime env, as the job's first line advises when it is too short): the
    driver stops at its next safe point with a checkpoint and the resume command, and the job
    ends STOPPED. `ray job submit ... -- ddpo train --resume RUN_DIR` goes on from there to the
    uninterrupted run's result, bit for bit."""
    address, env, _ = ray_head
    run_dir = tmp_path / "runs" / "stopped"
    deadline = time.monotonic() + 300
    wait = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}})
    _submit(address, env, "ddpo-stopped", *_train(tmp_path / "runs", "stopped"), options=["--runtime-env-json", wait])
    _wait_for("first epoch", lambda: len(run_metrics(run_dir)) >= 1 or _ended(address, "ddpo-stopped"), deadline)
    # what `ray job stop` asks of the job server (the command itself takes seconds to start,
    # and the small run is over in a few)
    _api(address, "/api/jobs/ddpo-stopped/stop", method="POST")
    _wait_for("stopped job", lambda: _ended(address, "ddpo-stopped"), deadline)
    logs = _logs(address, "ddpo-stopped")
    assert _status(address, "ddpo-stopped") == "STOPPED", logs[-3000:]
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint.name < f"epoch_{SMALL_DIGITS_EPOCHS - 1:04d}", logs[-3000:]
    assert "\nSIGTERM: stopping at the next safe point, with a checkpoint" in logs
    assert f"\nstopped by SIGTERM: checkpoint {checkpoint}; go on with: ddpo train --resume {run_dir}\n" in logs
    assert "note: `ray job stop`" not in logs
    for sign in ("logging.cc", "SIGTERM received", "Traceback"):
        assert sign not in logs, logs[-3000:]

    _submit(address, env, "ddpo-stopped-resumed", "ddpo", "train", "--resume", str(run_dir))
    _wait_for("end of the resumed job", lambda: _ended(address, "ddpo-stopped-resumed"), deadline)
    logs = _logs(address, "ddpo-stopped-resumed")
    assert _status(address, "ddpo-stopped-resumed") == "SUCCEEDED", logs[-3000:]
    assert f"resuming from {checkpoint} at epoch {int(checkpoint.name[6:]) + 1}" in logs
    assert ("\nnote: `ray job stop` kills this job 3 s after its SIGTERM (RAY_JOB_STOP_WAIT_TIME_S), within "
            "cluster.stop_grace_s = 25 s: a stop may not reach its checkpoint; submit with --runtime-env-json "
            """'{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "30"}}'\n""") in logs
    assert_the_same_run(run_dir, uninterrupted_digits)


def test_the_job_server_refuses_requests_without_the_token(ray_head):
    address, _, _ = ray_head
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=5)
    assert info.value.code == 401
