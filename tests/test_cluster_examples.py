"""The example cluster files name the right entrypoint and offer what the config asks for."""

from pathlib import Path

import yaml

from ddpo.config import load_config

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = "ddpo train --config configs/sd15_aesthetic.yaml"


def _asks():
    """(total CPUs, total GPUs, the largest single actor's (CPUs, GPUs)) of the SD1.5 aesthetic run."""
    c = load_config(ROOT / "configs" / "sd15_aesthetic.yaml").cluster
    actors = [c.sampler] * c.num_samplers + [c.reward] * c.num_reward_actors + [c.learner]
    return (sum(a.num_cpus for a in actors), sum(a.num_gpus for a in actors),
            max((a.num_cpus, a.num_gpus) for a in actors))


def test_ray_up_cluster_yaml_fits_the_aesthetic_run():
    text = (ROOT / "cluster" / "cluster.yaml").read_text()
    cluster = yaml.safe_load(text)
    assert f"-- {ENTRYPOINT}" in text  # the documented job command
    cpus, gpus, (actor_cpus, actor_gpus) = _asks()
    workers = [t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]]
    assert sum(t["min_workers"] * t["resources"].get("GPU", 0) for t in workers) >= gpus == 8
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
