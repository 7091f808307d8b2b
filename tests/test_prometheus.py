"""End to end with a real Prometheus, set up as Ray expects: `ddpo train` runs a local Ray instance,
whose dashboard writes `<session dir>/metrics/prometheus/prometheus.yml` (file service discovery
of the session's metrics endpoints, `<session dir>/prom_metrics_service_discovery.json`) and
`<session dir>/metrics/grafana/`; a `prometheus` binary started with that scrape config serves the
run's metrics through its HTTP API.

Prometheus pulls, and a local run's Ray instance ends with the run: the last epoch's values are
exported one metrics report (RAY_metrics_report_interval_ms) and one scrape after they are set,
which may be after the run is gone. So here the run's Ray instance is held at its end (its
`ray.shutdown` waits for a file the test writes) until Prometheus has the last line of
metrics.jsonl. `.ci/run` installs Debian's `prometheus`; without it the test skips and says why
(`pytest -rs`)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no `prometheus` on PATH (.ci/run installs Debian's "
                                                           "with apt-get; it could not here)")
NAMES = ("ray_ddpo_policy_version", "ray_ddpo_reward_mean")
NUM_EPOCHS = 3
SMALL = {"num_epochs": NUM_EPOCHS, "sample.num_steps": 4, "sample.batch_size": 4, "sample.num_batches_per_epoch": 2,
         "train.batch_size": 4, "cluster.num_samplers": 1, "cluster.num_learners": 1, "eval_images": 0}

# `ddpo train` (cluster.cli.main, as `python -m cluster.cli` runs it) whose ray.shutdown, at the
# run's end, waits up to 60 s for the file argv[1]
HELD_AT_THE_END = """
import sys, time
from pathlib import Path

from cluster.cli import main  # first: it quiets the libraries before they are imported
import ray

release, shutdown = Path(sys.argv[1]), ray.shutdown


def shutdown_when_released(*args, **kwargs):
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    shutdown(*args, **kwargs)


ray.shutdown = shutdown_when_released
sys.exit(main(sys.argv[2:]))
"""


def _get_json(url: str):
    try:
        return json.load(urllib.request.urlopen(url, timeout=5))
    except OSError:  # not serving yet
        return None


def _lines(path: Path) -> list[dict]:
    """metrics.jsonl's complete lines so far."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def _stop(proc: subprocess.Popen, sig: int, timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_scrapes_the_run_with_rays_generated_config(tmp_path):
    """Prometheus's ray_ddpo_policy_version and ray_ddpo_reward_mean equal the last line of
    metrics.jsonl; every value it scraped is one of metrics.jsonl's; the DDPO dashboard lies in
    the folder Ray's Grafana provisioning loads dashboards from."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ddpo-prom-", dir="/tmp"))  # short: Ray's socket paths live there
    release = tmp_path / "release"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_metrics_report_interval_ms": "200"}
    env.pop("RAY_ADDRESS", None)  # a local Ray instance of the run's own
    settings = [arg for key, value in {"output_dir": tmp_path, "run_name": "x", **SMALL}.items()
                for arg in ("--set", f"{key}={value}")]
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log:
        run = subprocess.Popen([sys.executable, "-c", HELD_AT_THE_END, str(release), "train", *settings], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    prometheus = None
    started = time.monotonic()
    deadline = started + 300

    def check_running(what: str) -> None:
        assert run.poll() is None, f"`ddpo train` ended ({run.returncode}) before {what}: {log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.05)

    try:
        # Ray's scrape config for the run's session, written when the session's dashboard starts
        generated = ray_tmp / "ray" / "session_latest" / "metrics" / "prometheus" / "prometheus.yml"
        while not generated.exists():
            check_running("Ray's prometheus.yml")
        session = generated.parents[2].resolve()
        config = yaml.safe_load(generated.read_text())
        (sd_file,) = [f for job in config["scrape_configs"] for sd in job["file_sd_configs"] for f in sd["files"]]
        assert Path(sd_file) == session / "prom_metrics_service_discovery.json"  # this session's endpoints
        config["global"] = {"scrape_interval": "500ms", "scrape_timeout": "500ms", "evaluation_interval": "500ms"}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        with (tmp_path / "prometheus.log").open("w") as prometheus_log:
            prometheus = subprocess.Popen(
                [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
                 "--log.level=warn"], stdout=prometheus_log, stderr=subprocess.STDOUT)
        api = f"http://127.0.0.1:{port}/api/v1"
        selector = f'{{__name__=~"{"|".join(NAMES)}",SessionName="{session.name}"}}'

        def scraped(query: str) -> dict[str, list]:
            reply = _get_json(f"{api}/query?" + urllib.parse.urlencode({"query": query})) or {"data": {"result": []}}
            return {r["metric"]["__name__"]: r.get("values") or [r["value"]] for r in reply["data"]["result"]}

        # while the run goes on, and at its end until Prometheus has the last line
        metrics_path = tmp_path / "x" / "metrics.jsonl"
        seen = []  # (seconds into the run, epoch of metrics.jsonl's last line, Prometheus's values) as they change
        while True:
            lines = _lines(metrics_path)
            values = {name: float(v[0][1]) for name, v in scraped(selector).items() if len(v) == 1}
            if lines and (not seen or seen[-1][1:] != (lines[-1]["epoch"], values)):
                seen.append((round(time.monotonic() - started, 1), lines[-1]["epoch"], values))
            if len(lines) == NUM_EPOCHS and values == {"ray_ddpo_policy_version": lines[-1]["policy_version"],
                                                       "ray_ddpo_reward_mean": lines[-1]["reward_mean"]}:
                break
            check_running(f"Prometheus's values equal to metrics.jsonl's last line (so far: {seen})")
        release.touch()
        assert run.wait(timeout=120) == 0, log_path.read_text()[-3000:]
        print(f"\nmetrics.jsonl's last epoch and Prometheus's values, as they changed (s into the run): {seen}")

        # everything Prometheus kept of the run is in metrics.jsonl, epoch by epoch
        kept = {name: {float(v) for _, v in values} for name, values in scraped(f"{selector}[10m]").items()}
        assert kept["ray_ddpo_policy_version"] <= {m["policy_version"] for m in lines}, kept
        assert kept["ray_ddpo_reward_mean"] <= {m["reward_mean"] for m in lines}, kept

        # Grafana started with Ray's grafana.ini provisions the dashboards of the folder that
        # provisioning/dashboards/default.yml names: the DDPO dashboard is there, beside Ray's
        grafana = session / "metrics" / "grafana"
        provisioning = ray_tmp / "ray" / "session_latest" / "metrics" / "grafana" / "provisioning"
        assert f"provisioning = {provisioning}\n" in (grafana / "grafana.ini").read_text()
        (provider,) = yaml.safe_load((provisioning / "dashboards" / "default.yml").read_text())["providers"]
        folder = Path(provider["options"]["path"])
        assert (folder / "default_grafana_dashboard.json").is_file()
        dashboard = json.loads((folder / "ddpo_grafana_dashboard.json").read_text())
        assert (dashboard["uid"], dashboard["title"]) == ("ddpo-ray", "DDPO")
    finally:
        release.touch()
        _stop(run, signal.SIGINT, 60)  # only after a failure: Ctrl-C, as a user stops a run
        if prometheus is not None:
            _stop(prometheus, signal.SIGTERM, 10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
