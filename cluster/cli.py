"""The `ddpo` command line.

    ddpo train [--config FILE] [--set key=value ...] [--address auto|ray://...]

With no --config, `ddpo train` runs the embedded default (configs/tiny.yaml: a tiny random
model on CPU). Every problem the user can fix is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path

# Quiet the libraries before they are imported (here and, by inheritance, in Ray's workers).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_CONFIG = "tiny.yaml"


class UsageError(Exception):
    """A problem the user fixes in the config or the command line."""


def default_config_path() -> Path:
    return Path(str(resources.files("configs").joinpath(DEFAULT_CONFIG)))


def _prepare(args):
    """Load and check everything that can be checked before Ray starts."""
    from ddpo.config import load_config
    from ddpo.pipeline import check_pretrained
    from rewards import load_reward

    config = load_config(args.config or default_config_path(), args.set)
    config.load_prompts()
    load_reward(config.reward.name)
    # Ray's workers may start in another directory: hand them an absolute model path
    config.model.pretrained = check_pretrained(config.model.pretrained, config.model.revision)
    if args.address is not None:
        config.cluster.address = args.address
    return config


def _check_resources(config) -> None:
    import ray

    c = config.cluster
    asked = {
        "CPU": c.sampler.num_cpus * c.num_samplers + c.reward.num_cpus * c.num_reward_actors + c.learner.num_cpus,
        "GPU": c.sampler.num_gpus * c.num_samplers + c.reward.num_gpus * c.num_reward_actors + c.learner.num_gpus,
    }
    have = ray.cluster_resources()
    for resource, amount in asked.items():
        if amount > have.get(resource, 0):
            raise UsageError(
                f"cluster: the actors ask for {amount:g} {resource} in all "
                f"({c.num_samplers} samplers, {c.num_reward_actors} reward actors, 1 learner) but the "
                f"Ray cluster has {have.get(resource, 0):g}; lower cluster.*.num_{resource.lower()}s "
                "or cluster.num_samplers"
            )


def train(args) -> int:
    import ray

    from cluster.driver import Driver
    from cluster.run_dir import make_run_dir

    config = _prepare(args)
    run_dir = make_run_dir(config)
    if config.cluster.address is None:
        context = ray.init(namespace="ddpo", include_dashboard=True, dashboard_host="127.0.0.1",
                           log_to_driver=True)
    else:
        context = ray.init(address=config.cluster.address, namespace="ddpo")
    dashboard = context.dashboard_url
    print(f"run directory: {run_dir.resolve()}")
    print(f"Ray dashboard: http://{dashboard}" if dashboard else "Ray dashboard: not running")
    driver = None
    try:
        _check_resources(config)
        driver = Driver(config, run_dir)
        history = driver.fit()
    finally:
        if driver is not None:
            driver.shutdown()
        ray.shutdown()
    first, last = history[0]["reward_mean"], history[-1]["reward_mean"]
    print(f"reward_mean: first epoch {first:.4f}, last epoch {last:.4f}")
    print(f"metrics: {run_dir / 'metrics.jsonl'}; LoRA: {run_dir / 'checkpoints'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpo", description="DDPO fine-tuning of diffusion models on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train a LoRA with DDPO")
    p.add_argument("--config", help=f"YAML config (default: the embedded configs/{DEFAULT_CONFIG})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.learning_rate=1e-3 (repeatable)")
    p.add_argument("--address", help="Ray cluster to join: auto or ray://host:10001 (default: start a local one)")
    p.set_defaults(func=train)
    return parser


def _user_error(err: BaseException) -> BaseException | None:
    """The user-fixable error behind `err`, also when it arrives wrapped by Ray."""
    from ddpo.config import ConfigError
    from ddpo.pipeline import ModelLoadError
    from rewards import RewardError

    fixable = (ConfigError, ModelLoadError, RewardError, UsageError, FileExistsError)
    seen = err
    while seen is not None:
        wrapped = getattr(seen, "cause", None)  # Ray's task errors carry the original as .cause
        if isinstance(wrapped, BaseException) and wrapped is not seen:
            seen = wrapped
        elif isinstance(seen, fixable):
            return seen
        else:
            seen = seen.__cause__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ddpo: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"ddpo: error: {user_error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
