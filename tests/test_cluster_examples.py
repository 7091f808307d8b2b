"""The example cluster files name the right entrypoint and offer what the config asks for."""

import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.cli import STOP_MARGIN_S, job_stop_wait_note
from cluster.placement import Devices, resolve_layout
from ddpo.config import load_config

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = "ddpo train --config configs/sd15_aesthetic.yaml"


def _devices(name="sd15_aesthetic", gpus=8.0):
    config = resolve_layout(load_config(ROOT / "configs" / f"{name}.yaml"), {"CPU": 96.0, "GPU": gpus})
    return Devices.of(config.cluster)


def _asks():
    """(total CPUs, total GPUs, the largest bundle's (CPUs, GPUs)) of the SD1.5 aesthetic run."""
    devices = _devices()
    totals = devices.totals()
    return (totals["CPU"], totals["GPU"], max((b.get("CPU", 0), b.get("GPU", 0)) for b in devices.bundles))


def test_the_sd15_configs_keep_every_gpu_busy():
    """Each config's layout puts a worker (a sampler and a learner rank, one model) on every GPU
    its diffusers work uses (colocated: each GPU samples, then trains), and the reward actors in
    what is left."""
    for name, reward_gpus in [("sd15_aesthetic", 0), ("sd15_compressibility", 0), ("sd15_incompressibility", 0),
                              ("sd15_alignment", 1)]:
        devices = _devices(name)
        pairs = [names for names in devices.members if not names[0].startswith("reward")]
        assert all(names == [f"worker-{i}"] for i, names in enumerate(pairs)), name
        # a device bundle per GPU (more than half a GPU each: no two share one), the reward's
        # whole GPUs beside them, and fractions of a GPU fit in what the devices leave
        assert all(0.5 < devices.bundles[devices.index[names[0]]]["GPU"] <= 1 for names in pairs), name
        assert len(pairs) + reward_gpus == 8 and devices.totals()["GPU"] <= 8, name


def test_ray_up_cluster_yaml_fits_the_aesthetic_run():
    text = (ROOT / "cluster" / "cluster.yaml").read_text()
    cluster = yaml.safe_load(text)
    assert f"-- {ENTRYPOINT}" in text  # the documented job command
    cpus, gpus, (actor_cpus, actor_gpus) = _asks()
    workers = [t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]]
    assert sum(t["min_workers"] * t["resources"].get("GPU", 0) for t in workers) >= 8 >= gpus
    assert sum(t["min_workers"] * t["resources"]["CPU"] for t in workers) >= cpus
    assert any(t["resources"]["CPU"] >= actor_cpus and t["resources"].get("GPU", 0) >= actor_gpus for t in workers)
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert any("pip install" in command and "ddpo-ray" in command for command in cluster["setup_commands"])


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_kuberay_rayjob_runs_the_aesthetic_config_on_enough_gpus():
    job = yaml.safe_load((ROOT / "cluster" / "rayjob_sd15_aesthetic.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"].startswith(ENTRYPOINT)
    cpus, gpus, (actor_cpus, actor_gpus) = _asks()
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = [(g["replicas"], g["template"]["spec"]["containers"][0]["resources"]["limits"]) for g in groups]
    assert sum(n * int(lim.get("nvidia.com/gpu", 0)) for n, lim in limits) >= gpus
    assert sum(n * _cpus(lim["cpu"]) for n, lim in limits) >= cpus
    assert any(_cpus(lim["cpu"]) >= actor_cpus and int(lim.get("nvidia.com/gpu", 0)) >= actor_gpus for _, lim in limits)
    image = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert all(g["template"]["spec"]["containers"][0]["image"] == image for g in groups)
    assert "pip install" in (ROOT / "cluster" / "Dockerfile").read_text()


def test_kuberay_head_points_the_dashboard_at_prometheus_and_grafana():
    """The Ray dashboard's Metrics tab reads RAY_PROMETHEUS_HOST and RAY_GRAFANA_HOST from the
    head's environment (ray/dashboard/modules/metrics/metrics_head.py); Grafana runs in its own
    pod, so the browser fetches its panels from RAY_GRAFANA_IFRAME_HOST. Each is a URL."""
    job = yaml.safe_load((ROOT / "cluster" / "rayjob_sd15_aesthetic.yaml").read_text())
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {var["name"]: var["value"] for var in head.get("env", [])}
    for name in ["RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST"]:
        assert re.fullmatch(r"http://[a-z0-9.-]+:\d+", env.get(name, "")), f"{name} in the head's env: {env}"
    assert env["RAY_PROMETHEUS_HOST"].endswith(".svc:9090")  # in-cluster services, as in KubeRay's docs
    assert ".svc:" in env["RAY_GRAFANA_HOST"]


def _pods(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"],
            **{g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]}}


def _pre_stop(pod: dict) -> str:
    command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    return command[2]


def test_kuberay_pods_give_a_stop_the_grace_of_the_config(monkeypatch):
    """cluster.stop_grace_s of the entrypoint's config (its --config and --set) is the driver's
    time from SIGTERM to its checkpoint. Each pod's terminationGracePeriodSeconds leaves it that
    and more; the preStop hooks wait for it (the head's: the driver it sends SIGTERM to; a
    worker's: its learner rank, which writes the checkpoint), as does `ray job stop`
    (RAY_JOB_STOP_WAIT_TIME_S in the head's environment, which its jobs inherit)."""
    job = yaml.safe_load((ROOT / "cluster" / "rayjob_sd15_aesthetic.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    overrides = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
    grace = load_config(ROOT / argv[argv.index("--config") + 1], overrides).cluster.stop_grace_s
    wait = math.ceil(grace) + STOP_MARGIN_S  # what the driver may take, its exit included
    pods = _pods(job)
    for name, pod in pods.items():
        assert pod["terminationGracePeriodSeconds"] >= wait, name
        assert f"for i in $(seq {wait}); do" in _pre_stop(pod), name
    head = {var["name"]: var["value"] for var in pods["head"]["containers"][0]["env"]}
    assert int(head["RAY_JOB_STOP_WAIT_TIME_S"]) >= wait
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # as in a job's driver
    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", head["RAY_JOB_STOP_WAIT_TIME_S"])
    assert job_stop_wait_note(grace) is None  # nothing to warn about


def test_kuberay_pre_stop_hooks_signal_the_driver_and_wait_for_the_learner(tmp_path):
    """The hooks run here, each on a stand-in process with a name of its own (never a real
    `ddpo train` or learner of this machine): the head's sends SIGTERM to the driver and ends
    when the driver has; a worker's ends once no learner rank runs."""
    pods = _pods(yaml.safe_load((ROOT / "cluster" / "rayjob_sd15_aesthetic.yaml").read_text()))
    marker = f"stand-in-{os.getpid()}"
    head_hook = _pre_stop(pods["head"]).replace("d=ddpo", f"d={marker}")
    worker_hook = _pre_stop(pods["gpu-8x"]).replace('"ray::LearnerActor"', f'"{marker}-learner"').replace(
        '"ray::WorkerActor"', f'"{marker}-worker"')
    assert head_hook != _pre_stop(pods["head"]) and worker_hook != _pre_stop(pods["gpu-8x"])

    # a driver that exits 143 on SIGTERM, its command line holding `<marker> train`
    driver = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                               "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\nprint(flush=True)\n"
                               "time.sleep(60)", marker, "train"], stdout=subprocess.PIPE)
    try:
        driver.stdout.readline()  # its handler is in place
        subprocess.run(["/bin/sh", "-c", head_hook], timeout=30, check=True)
        assert driver.poll() == 143
    finally:
        driver.kill()
        driver.wait()

    for role in ("learner", "worker"):  # a learner rank of its own, or a colocated worker
        learner = subprocess.Popen(["/bin/bash", "-c", f"exec -a {marker}-{role} sleep 60"])
        try:
            while not Path(f"/proc/{learner.pid}/cmdline").read_bytes().startswith(f"{marker}-{role}".encode()):
                time.sleep(0.01)  # bash has not exec'd it under that name yet
            hook = subprocess.Popen(["/bin/sh", "-c", worker_hook])
            with pytest.raises(subprocess.TimeoutExpired):  # it waits while the rank runs
                hook.wait(timeout=1.5)
            learner.kill()
            learner.wait()
            assert hook.wait(timeout=30) == 0
        finally:
            learner.kill()
            learner.wait()
