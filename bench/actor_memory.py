"""The run's actors' memory, one model per device against one per actor: the digits default run
through Ray, colocated (its default: `worker-<i>` samples and trains on one model) and with the
same samplers and learner ranks each in a process of its own (`cluster.layout separate`, which at
lag 0 is the process structure the colocated layout had before the workers: sampler-i and
learner-i on device i, a model each). Prints JSON: per layout, each actor's resident memory
after the last epoch (`report()`: psutil RSS), their sum, and the epochs' images per
device-second; then the colocated sum's ratio to the separate one's.

    python bench/actor_memory.py [--epochs 3] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from cluster.driver import Driver  # noqa: E402
from cluster.local import start_local_ray  # noqa: E402
from cluster.run_dir import make_run_dir  # noqa: E402
from ddpo.config import load_config  # noqa: E402

LAYOUTS = ("colocated", "separate")


def measure(layout: str, epochs: int, overrides: list[str], output: Path) -> dict:
    config = load_config(ROOT / "configs" / "digits.yaml", [
        f"num_epochs={epochs}", "eval_images=0", "checkpoint_every_s=0", f"cluster.layout={layout}", *overrides,
        f"output_dir={output}", f"run_name={layout}"])
    driver = Driver(config, make_run_dir(config))
    try:
        history = driver.fit()
        rss = {name: report["rss_bytes"] for name, report in driver.reports.items()}
    finally:
        driver.shutdown()
    return {"devices": driver.placement.describe(), "actors_rss_mib": {k: round(v / 2**20) for k, v in rss.items()},
            "sum_rss_mib": round(sum(rss.values()) / 2**20),
            "images_per_device_s": [round(m["images_per_device_s"], 2) for m in history]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    start_local_ray(include_dashboard=False, namespace="ddpo-actor-memory", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as output:
            results = {layout: measure(layout, args.epochs, args.set, Path(output)) for layout in LAYOUTS}
    finally:
        ray.shutdown()
    results["colocated_over_separate"] = round(results["colocated"]["sum_rss_mib"] / results["separate"]["sum_rss_mib"], 3)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
