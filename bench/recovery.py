"""Time from killing an actor to recovery, on the embedded tiny config under Ray. Prints JSON.

    python bench/recovery.py [--epochs 4] [--set key=value ...]

The tiny config with 2 samplers: `worker-0` (sampler 0 and the learner, one process) and
`sampler-1`, a sampler on a device of its own (a worker that dies takes the learner group's
restart: tests/test_system.py). For `sampler-1` and then `reward-0`: a run starts; once epoch 1 is
under way the actor's process
gets SIGKILL from outside (as an OOM killer or a lost node would). Reported per actor:
- `restart_s`: from the kill until Ray reports the actor ALIVE again in a new process;
- `epoch_s_killed` vs `epoch_s_median_others`: the wall time of the epoch that had the kill
  against the median of the undisturbed epochs (the difference is what the kill cost);
- `samples_per_epoch`: every epoch still trains its planned samples (no batch lost or doubled).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import psutil  # noqa: E402
import ray  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from cluster.cli import embedded_config  # noqa: E402
from cluster.driver import Driver  # noqa: E402
from cluster.local import start_local_ray  # noqa: E402
from cluster.run_dir import make_run_dir  # noqa: E402
from ddpo.config import load_config  # noqa: E402


def _actor_pid(name: str) -> tuple[str, int] | None:
    """(state, pid) of the live actor of that name (an earlier run's is DEAD)."""
    found = [a for a in list_actors(filters=[("name", "=", name)], detail=True, raise_on_missing_output=False)
             if a["state"] != "DEAD"]
    return (found[0]["state"], found[0]["pid"]) if found else None


def kill_and_time(name: str, metrics_path: Path, result: dict, stop: threading.Event) -> None:
    while not stop.is_set() and len(metrics_path.read_text().splitlines() if metrics_path.exists() else []) < 1:
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 1
    state = _actor_pid(name)
    if stop.is_set() or state is None:
        return
    killed_pid = state[1]
    psutil.Process(killed_pid).kill()
    killed_at = time.monotonic()
    while not stop.is_set():
        state = _actor_pid(name)
        if state and state[0] == "ALIVE" and state[1] != killed_pid:
            result["restart_s"] = time.monotonic() - killed_at
            return
        time.sleep(0.05)


def run(name: str, args, output_dir: str) -> dict:
    config = load_config(embedded_config("tiny.yaml"), [
        f"num_epochs={args.epochs}", "cluster.num_samplers=2", f"output_dir={output_dir}", f"run_name={name}",
        *args.set])
    run_dir = make_run_dir(config)
    result, stop = {}, threading.Event()
    killer = threading.Thread(target=kill_and_time, args=(name, run_dir / "metrics.jsonl", result, stop))
    driver = Driver(config, run_dir)
    killer.start()
    try:
        history = driver.fit()
    finally:
        stop.set()
        killer.join()
        driver.shutdown()
    epoch_s = [m["time_epoch_s"] for m in history]
    return {
        "restart_s": result.get("restart_s"),
        "epoch_s_killed": epoch_s[1],
        "epoch_s_median_others": statistics.median(epoch_s[:1] + epoch_s[2:]),
        "samples_per_epoch": [m["num_samples"] for m in history],
        "planned_samples_per_epoch": config.samples_per_epoch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    start_local_ray(namespace="ddpo", include_dashboard=True, log_to_driver=False)
    with tempfile.TemporaryDirectory() as output_dir:
        figures = {name: run(name, args, output_dir) for name in ["sampler-1", "reward-0"]}
    ray.shutdown()
    json.dump(figures, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
