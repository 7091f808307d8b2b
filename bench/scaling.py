"""Scaling of the whole system with the number of samplers and learner ranks. Prints one JSON
object.

    python bench/scaling.py [--epochs 6] [--warmup 1] [--layouts 1,1,0 2,2,0 ...] [--set key=value ...]

Each layout (samplers, learners, max_policy_lag) runs the digits default (configs/digits.yaml)
on Ray for `--epochs` epochs, all in one Ray instance, one after the other. The layout is the
config's `auto`: colocated at lag 0 (device i runs worker-i: sampler i and learner rank i in one
process), separate at lag 1.
A device is one core with one torch thread per actor (a fraction of a core each when the layout
has more devices than the machine has cores). The figures skip the first `--warmup` epochs:

- samples_per_s: samples trained per second of epoch wall time (broadcast to broadcast, the
  driver's recording included), and its ratio to the first layout's (1, 1, 0);
- sampler_s_per_sample, learner_s_per_sample: the role's busy seconds per sample, summed over
  its actors, and learner_to_sampler_cost, their ratio;
- idle: each role's idle fraction (1 - busy seconds / (actors x wall seconds)).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import ray  # noqa: E402

from cluster.cli import embedded_config  # noqa: E402
from cluster.driver import Driver  # noqa: E402
from cluster.local import start_local_ray  # noqa: E402
from cluster.metrics import ROLES  # noqa: E402
from cluster.run_dir import make_run_dir  # noqa: E402
from ddpo.config import load_config  # noqa: E402

LAYOUTS = ["1,1,0", "2,1,0", "1,2,0", "2,2,0", "1,1,1", "2,2,1"]


def run_layout(args, output_dir: str, samplers: int, learners: int, lag: int) -> dict:
    cores = int(ray.cluster_resources()["CPU"])
    devices = max(samplers, learners) if lag == 0 else samplers + learners
    cpus = min(1.0, int(cores / devices * 1e4) / 1e4)
    config = load_config(embedded_config("digits.yaml"), [
        f"num_epochs={args.epochs}", "eval_images=0", f"output_dir={output_dir}",
        f"run_name=s{samplers}-l{learners}-lag{lag}", f"cluster.num_samplers={samplers}",
        f"cluster.num_learners={learners}", f"cluster.max_policy_lag={lag}",
        f"cluster.sampler.num_cpus={cpus}", f"cluster.learner.num_cpus={cpus}",
        "cluster.sampler.num_threads=1", "cluster.learner.num_threads=1", *args.set])
    driver = Driver(config, make_run_dir(config))
    try:
        history = driver.fit()[args.warmup:]
        layout = driver.config.cluster.layout
    finally:
        driver.shutdown()
    seconds = sum(m["time_epoch_s"] for m in history)
    samples = sum(m["num_samples"] for m in history)
    busy_seconds = {role: sum(m[f"busy_{role}"] * m["time_epoch_s"] for m in history) for role in ROLES}
    counts = {"sampler": samplers, "learner": learners, "reward": config.cluster.num_reward_actors}
    sampler_s, learner_s = (busy_seconds[r] * counts[r] / samples for r in ("sampler", "learner"))
    return {"samplers": samplers, "learners": learners, "max_policy_lag": lag, "layout": layout,
            "cpus_per_device": cpus, "samples_per_s": samples / seconds,
            "sampler_s_per_sample": sampler_s, "learner_s_per_sample": learner_s,
            "learner_to_sampler_cost": learner_s / sampler_s,
            "idle": {role: 1 - busy_seconds[role] / seconds for role in ROLES},
            "reward_last_epoch": history[-1]["reward_mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layouts", nargs="+", default=LAYOUTS, help="samplers,learners,lag triples")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    results = []
    start_local_ray(include_dashboard=False, namespace="ddpo-bench", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as output_dir:
            for layout in args.layouts:
                samplers, learners, lag = (int(x) for x in layout.split(","))
                results.append(run_layout(args, output_dir, samplers, learners, lag))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    for result in results:
        result["ratio_to_first"] = result["samples_per_s"] / results[0]["samples_per_s"]
    print(json.dumps({"layouts": results,
                      "config": {"config": "digits.yaml", "epochs": args.epochs, "warmup": args.warmup,
                                 "cpus": os.cpu_count(), "overrides": args.set}}, indent=2))


if __name__ == "__main__":
    main()
