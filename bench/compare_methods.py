"""The paper's comparison at small scale: DDPO-IS, DDPO-SF and RWR, and DDPO-IS at policy lag 1,
on the digits task, each from the same base model with the same reward queries and seeds.
Prints a markdown table (mean ± std over the seeds).

    python bench/compare_methods.py [--epochs N] [--seeds 0 1 2] [--set key=value ...]

Every run is `configs/digits.yaml` (plus --set) on Ray for the same number of epochs, so every
method scores the same number of samples; learning rate, batch sizes, steps trained and
advantages are the config's for all of them. Each method overrides only what defines it:
- DDPO-IS: the config as it is (clipped importance-sampled steps, one per minibatch);
- DDPO-SF: the score-function gradient needs on-policy samples, so one optimizer step per
  round of sampling (Sec. 4.2 of the paper): the epoch's minibatches are accumulated into it;
- RWR: reward-weighted regression, per-sample weights exp(A / rwr_beta) (the config's beta);
- DDPO-IS, lag 1: `cluster.max_policy_lag: 1`, the sampler one epoch ahead of the learner.

Figures per run:
- reward and accuracy after training on the fixed eval batch (`--eval-images` images, the same
  prompts and seeds in every run, none of them an epoch's): the judge's probability of the
  prompted digit, and how often the judge's answer is that digit;
- the judged accuracy of the last 5 epochs' training samples;
- the first epoch whose samples reach 90% judged accuracy ("-" if none does).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from cluster.driver import Driver  # noqa: E402
from cluster.local import start_local_ray  # noqa: E402
from cluster.run_dir import make_run_dir  # noqa: E402
from ddpo.config import Config, load_config  # noqa: E402

CONFIG = ROOT / "configs" / "digits.yaml"


def methods(config: Config) -> dict[str, list[str]]:
    """Each method's overrides of the shared config: only what defines the method."""
    minibatches_per_epoch = config.samples_per_epoch // config.train.batch_size
    return {
        "DDPO-IS": ["train.algorithm=ddpo_is"],
        "DDPO-SF": ["train.algorithm=ddpo_sf",
                    f"train.gradient_accumulation_steps={minibatches_per_epoch * config.train.num_inner_epochs}",
                    "train.num_inner_epochs=1"],
        "RWR": ["train.algorithm=rwr"],
        "DDPO-IS, lag 1": ["train.algorithm=ddpo_is", "cluster.max_policy_lag=1"],
    }


def run(overrides: list[str]) -> dict:
    config = load_config(CONFIG, overrides)
    run_dir = make_run_dir(config)
    driver = Driver(config, run_dir)
    try:
        start = time.perf_counter()
        history = driver.fit()
        wall_s = time.perf_counter() - start
    finally:
        driver.shutdown()
    evaluation = json.loads((run_dir / "eval.json").read_text())
    accuracy = [m["correct_mean"] for m in history]
    return {
        "after": evaluation["after"],
        "train_accuracy_last5": float(np.mean(accuracy[-5:])),
        "first_epoch_90": next((m["epoch"] for m in history if m["correct_mean"] >= 0.9), None),
        "samples_scored": config.samples_per_epoch * len(history),
        "wall_s": wall_s,
    }


def table(results: dict[str, list[dict]], seeds: list[int]) -> str:
    def cell(values) -> str:
        values = np.asarray(values, dtype=float)
        return f"{values.mean():.3f} ± {values.std():.3f}"

    def first_90(runs) -> str:
        return " / ".join("-" if r["first_epoch_90"] is None else str(r["first_epoch_90"]) for r in runs)

    header = ("| method | eval reward | eval accuracy | train accuracy, last 5 epochs "
              "| first epoch at 90% (per seed) | wall s |")
    lines = [header, "| --- | --- | --- | --- | --- | --- |"]
    for name, runs in results.items():
        lines.append(f"| {name} | {cell([r['after']['reward_mean'] for r in runs])} "
                     f"| {cell([r['after']['correct_mean'] for r in runs])} "
                     f"| {cell([r['train_accuracy_last5'] for r in runs])} | {first_90(runs)} "
                     f"| {np.mean([r['wall_s'] for r in runs]):.0f} |")
    samples = {r["samples_scored"] for runs in results.values() for r in runs}
    return (f"digits, {', '.join(map(str, sorted(samples)))} reward queries per run, seeds {seeds}, "
            f"mean ± std over seeds\n\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's num_epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-images", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=None, help="a subset, by name (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", type=Path, default=None,
                        help="keep the runs' directories and results.jsonl here (default: a temp dir)")
    args = parser.parse_args()
    shared = [f"eval_images={args.eval_images}", *args.set]
    if args.epochs is not None:
        shared.append(f"num_epochs={args.epochs}")
    variants = methods(load_config(CONFIG, shared))
    unknown = set(args.methods or []) - set(variants)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {list(variants)}")
    variants = {name: o for name, o in variants.items() if args.methods is None or name in args.methods}

    results: dict[str, list[dict]] = {name: [] for name in variants}
    start_local_ray(include_dashboard=False, namespace="ddpo-compare", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            output = args.output or Path(scratch)
            output.mkdir(parents=True, exist_ok=True)
            for seed in args.seeds:
                for k, (name, overrides) in enumerate(variants.items()):
                    result = run([*shared, *overrides, f"seed={seed}", f"output_dir={output}",
                                  f"run_name=method{k}-seed{seed}"])
                    results[name].append(result)
                    line = json.dumps({"method": name, "seed": seed, **result})
                    with open(output / "results.jsonl", "a") as f:
                        f.write(line + "\n")
                    print(line, file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    print(table(results, args.seeds))


if __name__ == "__main__":
    main()
