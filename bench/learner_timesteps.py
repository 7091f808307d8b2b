"""The learner with several timesteps of a minibatch in one UNet forward
(`train.timesteps_per_forward`): the same update, a bigger batch. Prints one JSON object.

    python bench/learner_timesteps.py [--config digits.yaml] [--per-forward 1 3] [--threads 1]
                                      [--repeats 3] [--set key=value ...]

Every setting trains a fresh learner on the same sampled epoch (one update, `train.*` of the
config); the time is the best of `--repeats` updates, in one process with `--threads` torch
threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from actors.reward import RewardWorker  # noqa: E402
from actors.sampler import Sampler  # noqa: E402
from cluster.cli import embedded_config  # noqa: E402
from ddpo.config import load_config  # noqa: E402
from ddpo.plan import epoch_plan  # noqa: E402
from ddpo.trajectory import EpochTrajectories  # noqa: E402
from learner import Learner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="digits.yaml", help="a config of configs/ or a path")
    parser.add_argument("--per-forward", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.config) if Path(args.config).is_file() else embedded_config(args.config)
    config = load_config(path, args.set)
    sampler = Sampler(config)
    sampler.set_weights(Learner(config).weights())
    batches = [sampler.sample(s.batch_id, s.prompts, s.seeds) for s in epoch_plan(config, config.load_prompts(), 0)]
    rewards = [r for _, r, _ in RewardWorker(config.reward).score(*[summary for _, summary in batches])]

    results = {}
    for per_forward in args.per_forward:
        timed = load_config(path, [*args.set, f"train.timesteps_per_forward={per_forward}"])
        seconds = []
        for _ in range(args.repeats):
            learner = Learner(timed)
            start = time.perf_counter()
            metrics = learner.train(EpochTrajectories.from_batches([full for full, _ in batches]), rewards)
            seconds.append(time.perf_counter() - start)
        results[per_forward] = {"learner_samples_per_s": config.samples_per_epoch / min(seconds),
                                "update_s": min(seconds), "loss": metrics["loss"]}
    base = results[args.per_forward[0]]["learner_samples_per_s"]
    for result in results.values():
        result["speedup"] = result["learner_samples_per_s"] / base
    t = config.train
    print(json.dumps({
        "timesteps_per_forward": results,
        "config": {"config": str(path.name), "samples_per_epoch": config.samples_per_epoch,
                   "minibatch": t.batch_size, "timesteps_trained": max(1, int(config.sample.num_steps * t.timestep_fraction)),
                   "cfg": t.cfg and config.sample.guidance_scale > 1, "resolution": config.sample.height,
                   "threads": args.threads, "overrides": args.set},
    }, indent=2))


if __name__ == "__main__":
    main()
