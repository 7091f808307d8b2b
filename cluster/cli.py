"""The `ddpo` command line.

    ddpo train [--config FILE] [--set key=value ...] [--address auto|ray://...] [--resume RUN_DIR]
    ddpo sample RUN_DIR [--checkpoint NAME | --base] [--prompt P ...] [--num-per-prompt N] [--seed S]
                [--out DIR] [--batch-size B] [--set key=value ...]
    ddpo export RUN_DIR --out DIR [--checkpoint NAME] [--merge [--device D] [--dtype T]]

With no --config, `ddpo train` runs the embedded default (configs/digits.yaml: the embedded
digits model and its judge, on CPU). Every problem the user can fix is one line on stderr and
exit status 2. Ctrl-C stops after the epoch under way with a checkpoint (exit status 130).

After a run (in this process, no Ray): `ddpo sample` draws images from a checkpoint's LoRA (the
latest by default) or from the base model (`--base`) with the run's model and sampler settings,
the same images for the same command; `ddpo export` writes a checkpoint as a diffusers folder
with a model card: the LoRA alone, or with `--merge` fused into the base pipeline (cluster/workflow.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from importlib import resources
from pathlib import Path

from cluster import QUIET_ENV

for _name, _value in QUIET_ENV.items():  # before the libraries are imported
    os.environ.setdefault(_name, _value)

DEFAULT_CONFIG = "digits.yaml"


class UsageError(Exception):
    """A problem the user fixes in the config or the command line."""


def embedded_config(name: str = DEFAULT_CONFIG) -> Path:
    """A config shipped in the package's `configs/` (the default of `ddpo train` when no name)."""
    return Path(str(resources.files("configs").joinpath(name)))


def _prepare(args):
    """Load and check everything that can be checked before Ray starts."""
    from ddpo.config import load_config
    from ddpo.pipeline import check_pretrained
    from rewards import check_reward

    if args.resume is not None:
        if args.config is not None:
            raise UsageError("--resume: the run's own config.yaml is used; drop --config (use --set to change values)")
        config_path = Path(args.resume) / "config.yaml"
        if not config_path.is_file():
            raise UsageError(f"--resume: '{args.resume}' is not a run directory (no config.yaml there)")
    else:
        config_path = args.config or embedded_config()
    config = load_config(config_path, args.set)
    config.load_prompts()
    for i, term in enumerate(config.reward.terms()):
        check_reward(term.name, term.params, f"reward.weighted[{i}]" if config.reward.weighted else "reward")
    # Ray's workers (and a job's driver) may start in another directory: absolute paths
    config.model.pretrained = check_pretrained(config.model.pretrained, config.model.revision)
    config.output_dir = str(Path(config.output_dir).resolve())
    if args.address is not None:
        config.cluster.address = args.address
    return config


@contextlib.contextmanager
def _stop_after_epoch_on_ctrl_c(driver):
    """The first Ctrl-C lets the epoch under way finish (its metrics and all), the second one
    interrupts at once. A KeyboardInterrupt raised at an arbitrary point can land in a finalizer,
    where Python ignores it: the handler only sets a flag, which the driver checks."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first_ctrl_c(signum, frame):
        driver.stop_requested.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nCtrl-C: stopping after this epoch (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, first_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def train(args) -> int:
    import ray

    from cluster.driver import ActorLost, Driver
    from cluster.metrics import bottleneck_hint, busy_summary
    from cluster.run_dir import latest_checkpoint, make_run_dir, truncate_metrics

    config = _prepare(args)
    if args.resume is None:
        run_dir, checkpoint = make_run_dir(config), None
    else:
        run_dir, checkpoint = Path(args.resume), latest_checkpoint(Path(args.resume))
        if checkpoint is None:
            raise UsageError(f"--resume: '{run_dir}' has no checkpoint to resume from")
    address = config.cluster.address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit`
    if address is None:  # local single-node mode: everything on loopback
        context = ray.init(namespace="ddpo", include_dashboard=True, dashboard_host="127.0.0.1")
    else:
        context = ray.init(address=address, namespace="ddpo")
    dashboard = context.dashboard_url
    print(f"run directory: {run_dir.resolve()}")
    print(f"Ray dashboard: http://{dashboard}" if dashboard else "Ray dashboard: not running")
    driver = None
    try:
        driver = Driver(config, run_dir)
        print(f"layout: {driver.config.cluster.layout}, {driver.placement.describe()}")
        start_epoch = 0
        if checkpoint is not None:
            start_epoch = driver.resume(checkpoint)
            truncate_metrics(run_dir, start_epoch)
            print(f"resuming from {checkpoint} at epoch {start_epoch}")
        with _stop_after_epoch_on_ctrl_c(driver):
            history = driver.fit(start_epoch)
        if driver.stop_requested.is_set():
            raise KeyboardInterrupt
    except ray.exceptions.RayActorError as err:
        if driver is None:
            raise
        raise ActorLost(driver.lost_actor_message(err)) from None
    except KeyboardInterrupt:
        # after a second Ctrl-C: waits for an update in progress, then saves the learner as it stands
        saved = driver.save_checkpoint() if driver is not None else None
        if saved is not None:
            print(f"\ninterrupted: checkpoint {saved}; go on with: ddpo train --resume {run_dir}")
        raise
    finally:
        if driver is not None:
            driver.shutdown()
        ray.shutdown()
    if history:
        first, last = history[0], history[-1]
        print(f"reward_mean: epoch {first['epoch']} {first['reward_mean']:.4f}, "
              f"epoch {last['epoch']} {last['reward_mean']:.4f}")
        busy = busy_summary(history)
        print(f"busy: samplers {busy['sampler']:.0%}, learners {busy['learner']:.0%}, "
              f"reward actors {busy['reward']:.0%}")
        hint = bottleneck_hint(busy, driver.config.cluster.layout, driver.config.cluster.max_policy_lag)
        if hint:
            print(f"bottleneck: {hint}")
    if (run_dir / "eval.json").exists():  # the fixed eval batch, before and after training
        evals = json.loads((run_dir / "eval.json").read_text())
        changes = ", ".join(f"{key} {evals['before'][key]:.4f} -> {evals['after'][key]:.4f}"
                            for key in evals["after"] if key != "reward_std")
        print(f"eval batch: {changes} ({run_dir / 'before_after.png'})")
    print(f"metrics: {run_dir / 'metrics.jsonl'}; LoRA: {run_dir / 'checkpoints'}")
    return 0


def sample(args) -> int:
    from cluster.workflow import sample_run

    result = sample_run(args.run_dir, checkpoint=args.checkpoint, base=args.base, prompts=args.prompt,
                        num_per_prompt=args.num_per_prompt, seed=args.seed, out=args.out, overrides=args.set,
                        batch_size=args.batch_size)
    source = (f"checkpoint {result.checkpoint.name}, {result.epochs} epochs trained" if result.checkpoint
              else "the base model, no LoRA")
    print(f"{len(result.images)} images ({source}): {result.out}; grid: {result.grid}")
    return 0


def export(args) -> int:
    from cluster.workflow import export_run

    if not args.merge and (args.device is not None or args.dtype is not None):
        raise UsageError("--device/--dtype: only with --merge (the LoRA alone is copied as it is)")
    result = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, merge=args.merge,
                        device=args.device or "cpu", dtype=args.dtype or "float32")
    name = f"{result.checkpoint.name} ({result.epochs} epochs trained)"
    what = f"{name} fused into the base pipeline" if result.merged else f"the LoRA of {name}"
    print(f"exported {what} to {result.out} (model card: {result.out / 'README.md'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpo", description="DDPO fine-tuning of diffusion models on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train a LoRA with DDPO")
    p.add_argument("--config", help=f"YAML config (default: the embedded configs/{DEFAULT_CONFIG})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.learning_rate=1e-3 (repeatable)")
    p.add_argument("--address", help="Ray cluster to join: auto or ray://host:10001 (default: start a local one)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="go on with the run in RUN_DIR from its latest checkpoint (its config.yaml, plus any --set)")
    p.set_defaults(func=train)

    p = commands.add_parser("sample", help="sample images from a run's checkpoint (or its base model)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (runs/<run_name>)")
    p.add_argument("--checkpoint", metavar="NAME", help="e.g. epoch_0007 (default: the latest)")
    p.add_argument("--base", action="store_true", help="the base model, without the LoRA")
    p.add_argument("--prompt", action="append", metavar="P",
                   help="a prompt (repeatable; default: the run's prompts)")
    p.add_argument("--num-per-prompt", type=int, default=4, metavar="N", help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="image i of every prompt gets noise seed 2**61 + S * 2**20 + i (default 0)")
    p.add_argument("--out", metavar="DIR", help="default: RUN_DIR/samples_<checkpoint> (samples_base with --base)")
    p.add_argument("--batch-size", type=int, metavar="B", help="images per sampling call (default: sample.batch_size)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the run's config, e.g. --set sample.num_steps=50 (repeatable)")
    p.set_defaults(func=sample)

    p = commands.add_parser("export", help="write a checkpoint as a diffusers folder with a model card")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (runs/<run_name>)")
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder")
    p.add_argument("--checkpoint", metavar="NAME", help="e.g. epoch_0007 (default: the latest)")
    p.add_argument("--merge", action="store_true",
                   help="fuse the LoRA into the base pipeline and save it whole (default: the LoRA alone)")
    p.add_argument("--device", help="with --merge: where to fuse (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="with --merge: the saved weights' dtype (default float32: it loads with no dtype argument)")
    p.set_defaults(func=export)
    return parser


def _user_error(err: BaseException) -> BaseException | None:
    """The user-fixable error behind `err`, also when it arrives wrapped by Ray."""
    from ddpo.config import ConfigError
    from ddpo.pipeline import ModelLoadError
    from rewards import RewardError

    from cluster.driver import ActorLost
    from cluster.placement import PlacementError

    fixable = (ConfigError, ModelLoadError, RewardError, UsageError, PlacementError, ActorLost, FileExistsError)
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
