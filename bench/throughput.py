"""Throughput of ddpo-ray's parts and of the whole system, and what Ray costs over the same
classes composed in one process. Prints one JSON object.

    python bench/throughput.py [--epochs 3] [--set key=value ...]

Each figure times the same work on the same config (configs/tiny.yaml unless --set
changes it): the in-process run and the Ray lag-0 run sample, score and train the same samples,
with the same number of torch threads per part (the actors' num_cpus). Model loading and actor
start-up are excluded; Ray's own start-up is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from actors.reward import RewardWorker  # noqa: E402
from actors.sampler import Sampler  # noqa: E402
from cluster.cli import embedded_config  # noqa: E402
from cluster.driver import Driver  # noqa: E402
from cluster.local import start_local_ray  # noqa: E402
from cluster.inprocess import InProcessRun  # noqa: E402
from cluster.loop import STAGES  # noqa: E402
from cluster.run_dir import make_run_dir  # noqa: E402
from ddpo.config import load_config  # noqa: E402
from ddpo.plan import epoch_plan  # noqa: E402
from ddpo.trajectory import EpochTrajectories  # noqa: E402
from learner import Learner  # noqa: E402


def _config(args, output_dir: str, run_name: str, extra: list[str] = ()):
    overrides = [f"num_epochs={args.epochs}", f"output_dir={output_dir}", f"run_name={run_name}",
                 "cluster.sampler.num_cpus=1", "cluster.learner.num_cpus=1", "eval_images=0", *args.set, *extra]
    return load_config(embedded_config("tiny.yaml"), overrides)


def bench_parts(config) -> dict:
    """The sampler and the learner alone, on one epoch of samples (after a warm-up batch)."""
    learner, sampler, reward = Learner(config), Sampler(config), RewardWorker(config.reward)
    sampler.set_weights(learner.weights())
    specs = epoch_plan(config, config.load_prompts(), 0)
    sampler.sample(specs[0].batch_id, specs[0].prompts, specs[0].seeds)  # warm-up
    start = time.perf_counter()
    batches = [sampler.sample(s.batch_id, s.prompts, s.seeds) for s in specs]
    sample_s = time.perf_counter() - start
    rewards = [rewards for _, rewards, _ in reward.score(*[summary for _, summary in batches])]
    start = time.perf_counter()
    learner.train(EpochTrajectories.from_batches([full for full, _ in batches]), rewards)
    train_s = time.perf_counter() - start
    return {"sampler_images_per_s": config.samples_per_epoch / sample_s,
            "learner_samples_per_s": config.samples_per_epoch / train_s}


def bench_ray(config) -> tuple[float, list[dict]]:
    """Wall time of Driver.fit (the whole run after the actors are up) and its metrics."""
    driver = Driver(config, make_run_dir(config))
    try:
        ray.get([actor.ready.remote() for actor in driver.actors])  # every model loaded
        start = time.perf_counter()
        history = driver.fit()
        return time.perf_counter() - start, history
    finally:
        driver.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as one actor with num_cpus=1
    with tempfile.TemporaryDirectory() as output_dir:
        config = _config(args, output_dir, "inprocess")
        parts = bench_parts(config)

        run = InProcessRun(config, make_run_dir(config))
        start = time.perf_counter()
        run.fit()
        inprocess_s = time.perf_counter() - start

        start = time.perf_counter()
        start_local_ray(include_dashboard=False, namespace="ddpo-bench", log_to_driver=False)
        ray_init_s = time.perf_counter() - start
        try:
            lag0_s, lag0 = bench_ray(_config(args, output_dir, "lag0"))
            lag1_s, _ = bench_ray(_config(args, output_dir, "lag1", ["cluster.max_policy_lag=1"]))
        finally:
            ray.shutdown()

    samples = config.samples_per_epoch * config.num_epochs
    print(json.dumps({
        **parts,
        "e2e_samples_per_s_lag0": samples / lag0_s,
        "e2e_samples_per_s_lag1": samples / lag1_s,
        "inprocess_samples_per_s": samples / inprocess_s,
        "ray_overhead_ratio": lag0_s / inprocess_s,
        "sync_s_per_version": float(np.mean([m["time_sync_s"] for m in lag0])),
        "sync_fraction_of_epoch": float(np.mean([m["time_sync_s"] / m["time_epoch_s"] for m in lag0])),
        # each stage's mean seconds an epoch (cluster.loop), and the epoch's
        "stage_s_lag0": {key.removeprefix("time_").removesuffix("_s"): float(np.mean([m[key] for m in lag0]))
                         for key in [f"time_{stage}_s" for stage in STAGES] + ["time_epoch_s"]},
        "ray_init_s": ray_init_s,
        "wall_s": {"inprocess": inprocess_s, "ray_lag0": lag0_s, "ray_lag1": lag1_s},
        "config": {"epochs": config.num_epochs, "samples_per_epoch": config.samples_per_epoch,
                   "num_steps": config.sample.num_steps, "resolution": config.sample.height,
                   "num_inner_epochs": config.train.num_inner_epochs, "model": config.model.pretrained,
                   "torch_threads_per_part": 1, "cpus": os.cpu_count(), "overrides": args.set},
    }, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
