"""Random SIGKILLs of samplers, workers, reward actors and learner ranks during one run on the
digits default config, against the same run undisturbed. Prints JSON.

    python bench/chaos.py [--epochs 20] [--kills 10] [--seed 0] [--interval-s 5] [--set key=value ...]

The config is the embedded default (configs/digits.yaml) with `--epochs` epochs, a checkpoint
every 2 epochs (a restarted learner group replays at most the epochs since) and restart limits
that `--kills` kills cannot exhaust (`cluster.max_restarts`, `cluster.learner_max_restarts`),
then `--set`. The undisturbed run goes first, then the chaos run with the same config. Once the
chaos run has recorded its first epoch, a thread kills `--kills` times: it sleeps
uniform(0.5, 1.5) x `--interval-s` (seeded by `--seed`), picks a role at random among those with
an ALIVE actor (Ray's state API), a random ALIVE actor of it, and SIGKILLs its process, as an OOM
killer or a lost node would. Ray restarts a sampler or reward actor; the driver restarts the
learner group from its latest checkpoint when a learner rank or a worker (a colocated device's
sampler and learner rank in one process: the default layout's) dies. A second thread times each kill's recovery: until an
actor of that name is ALIVE again in another process (null: not before the run ended).

Reported: each kill (`actor`, `at_s` since the chaos run's fit started, `recover_s`); the kills
per role and the median and max `recover_s` per role; Ray's restarts of samplers and reward
actors, the driver's learner group restarts and the recorded epochs they made it train again
(`epochs_redone`); samples planned, trained (the final metrics.jsonl) and duplicated
(`duplicate_batches`), `dropped_stale`; whether metrics.jsonl holds one line per epoch; the
fit's wall time undisturbed and in chaos; and `lora_equal`: whether the final checkpoint's LoRA
tensors equal the undisturbed run's bit for bit (expected at `max_policy_lag` 0, reported too).
`error` is the chaos run's exception in one line, if it ended in one (null otherwise).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
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
import torch  # noqa: E402
from ray.util.state import list_actors  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from cluster.cli import embedded_config  # noqa: E402
from cluster.driver import Driver  # noqa: E402
from cluster.local import start_local_ray  # noqa: E402
from cluster.run_dir import latest_checkpoint, make_run_dir, read_metrics  # noqa: E402
from ddpo.config import load_config  # noqa: E402

ROLES = ("sampler", "worker", "reward", "learner")
LORA_FILE = "pytorch_lora_weights.safetensors"


class ChaosDriver(Driver):
    """The driver, counting the recorded epochs that its learner group restarts train again:
    for each restart, from the epoch it replays from up to the epoch that failed."""

    epochs_redone = 0
    epoch_under_way = 0

    def run_epoch(self, epoch: int) -> dict:
        self.epoch_under_way = epoch
        return super().run_epoch(epoch)

    def recover_learners(self, err) -> int:
        epoch = super().recover_learners(err)
        self.epochs_redone += self.epoch_under_way - epoch
        return epoch


def role_of(name: str) -> str:
    return name.split("-")[0]


def alive_actors() -> dict[str, dict]:
    """The ALIVE actors of the run, by name (`sampler-0`, ...), with their `pid`."""
    found = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000,
                        raise_on_missing_output=False)
    return {a["name"]: a for a in found if a["name"] and role_of(a["name"]) in ROLES}


def ray_restarts() -> dict[str, int]:
    """Ray's restarts of the run's live sampler and reward actors, summed per role."""
    found = list_actors(filters=[("state", "!=", "DEAD")], detail=True, limit=10_000,
                        raise_on_missing_output=False)
    restarts = {"sampler": 0, "reward": 0}
    for actor in found:
        if actor["name"] and role_of(actor["name"]) in restarts:
            restarts[role_of(actor["name"])] += actor["num_restarts"]
    return restarts


def kill_randomly(kills: list[dict], metrics_path: Path, started: float, stop: threading.Event, *,
                  num_kills: int, interval_s: float, rng: random.Random) -> None:
    """Once `metrics_path` has a line, `num_kills` times (until `stop`): sleep, SIGKILL a random
    ALIVE actor of a random role, append {actor, pid, at_s, recover_s: None} to `kills`."""
    while not stop.is_set() and not (metrics_path.exists() and metrics_path.read_text().strip()):
        time.sleep(0.1)
    while len(kills) < num_kills and not stop.wait(rng.uniform(0.5, 1.5) * interval_s):
        alive = alive_actors()
        if not alive:
            continue
        role = rng.choice(sorted({role_of(name) for name in alive}))
        name = rng.choice(sorted(n for n in alive if role_of(n) == role))
        try:
            psutil.Process(alive[name]["pid"]).kill()
        except psutil.NoSuchProcess:  # it died meanwhile (a learner the driver just killed)
            continue
        kills.append({"actor": name, "pid": alive[name]["pid"], "at_s": round(time.monotonic() - started, 2),
                      "recover_s": None})


def time_recoveries(kills: list[dict], started: float, stop: threading.Event) -> None:
    """Until `stop`: set each kill's `recover_s` once an actor of its name is ALIVE in a process
    other than the killed one."""
    while not stop.wait(0.25):
        pending = [kill for kill in kills if kill["recover_s"] is None]
        if not pending:
            continue
        alive = alive_actors()
        now = time.monotonic() - started
        for kill in pending:
            actor = alive.get(kill["actor"])
            if actor is not None and actor["pid"] != kill["pid"]:
                kill["recover_s"] = round(now - kill["at_s"], 2)


def lora_equal(a: Path, b: Path) -> bool:
    """Whether two LoRA safetensors files hold the same tensors, bit for bit."""
    tensors_a, tensors_b = load_file(str(a)), load_file(str(b))
    return tensors_a.keys() == tensors_b.keys() and all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


def summarize(kills: list[dict], metrics: list[dict], num_epochs: int, samples_per_epoch: int) -> dict:
    """Each kill (its actor, `at_s`, `recover_s`), and the totals of the kills and of the run's
    final metrics lines."""
    recover_s = {role: [k["recover_s"] for k in kills if role_of(k["actor"]) == role and k["recover_s"] is not None]
                 for role in ROLES}
    return {
        "per_kill": [{k: kill[k] for k in ("actor", "at_s", "recover_s")} for kill in kills],
        "kills": len(kills),
        "kills_per_role": {role: sum(role_of(k["actor"]) == role for k in kills) for role in ROLES},
        "unrecovered": sum(k["recover_s"] is None for k in kills),
        "recover_s": {role: {"median": statistics.median(s), "max": max(s)} if s else None
                      for role, s in recover_s.items()},
        "learner_group_restarts": metrics[-1]["learner_restarts"] if metrics else 0,
        "samples_planned": num_epochs * samples_per_epoch,
        "samples_trained": sum(m["num_samples"] for m in metrics),
        "duplicate_batches": sum(m["duplicate_batches"] for m in metrics),
        "dropped_stale": sum(m["dropped_stale"] for m in metrics),
        "one_metrics_line_per_epoch": [m["epoch"] for m in metrics] == list(range(num_epochs)),
    }


def run(config, killer=None) -> dict:
    """One fit of `config`; with `killer` (kill_randomly with its keyword arguments bound) the
    actors are killed meanwhile, and the fit may end in an error. Returns the run dir, the
    fit's wall time, the kills, Ray's restarts, the epochs redone, the error (or None) and the
    resolved config."""
    run_dir = make_run_dir(config)
    driver = ChaosDriver(config, run_dir)
    kills, stop, started = [], threading.Event(), time.monotonic()
    threads = [threading.Thread(target=killer, args=(kills, run_dir / "metrics.jsonl", started, stop)),
               threading.Thread(target=time_recoveries, args=(kills, started, stop))] if killer else []
    for thread in threads:
        thread.start()
    error = None
    try:
        driver.fit()
    except Exception as err:  # a chaos run that fails is reported with what it got to
        if killer is None:
            raise
        error = f"{type(err).__name__}: {err}".splitlines()[0]
    finally:
        wall_s = time.monotonic() - started
        stop.set()
        for thread in threads:
            thread.join()
        restarts = ray_restarts()
        driver.shutdown()
    return {"run_dir": run_dir, "wall_s": wall_s, "kills": kills, "ray_restarts": restarts,
            "epochs_redone": driver.epochs_redone, "error": error, "config": driver.config}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval-s", type=float, default=5.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    start_local_ray(namespace="ddpo", include_dashboard=True, log_to_driver=False)
    with tempfile.TemporaryDirectory() as output_dir:
        def config(name):
            return load_config(embedded_config("digits.yaml"), [
                f"num_epochs={args.epochs}", "checkpoint_every=2", f"cluster.max_restarts={args.kills}",
                f"cluster.learner_max_restarts={args.kills}", f"output_dir={output_dir}", f"run_name={name}",
                *args.set])

        undisturbed = run(config("undisturbed"))
        chaos = run(config("chaos"), functools.partial(kill_randomly, num_kills=args.kills,
                                                       interval_s=args.interval_s, rng=random.Random(args.seed)))
        metrics = read_metrics(chaos["run_dir"])
        final = [latest_checkpoint(r["run_dir"]) for r in (undisturbed, chaos)]
        equal = (None not in final and final[0].name == final[1].name
                 and lora_equal(final[0] / LORA_FILE, final[1] / LORA_FILE))
    ray.shutdown()
    c = chaos["config"]
    figures = {
        "config": {"num_epochs": c.num_epochs, "samples_per_epoch": c.samples_per_epoch,
                   "checkpoint_every": c.checkpoint_every, "num_samplers": c.cluster.num_samplers,
                   "num_reward_actors": c.cluster.num_reward_actors, "num_learners": c.cluster.num_learners,
                   "kills_requested": args.kills, "interval_s": args.interval_s, "seed": args.seed},
        **summarize(chaos["kills"], metrics, c.num_epochs, c.samples_per_epoch),
        "ray_restarts": chaos["ray_restarts"],
        "epochs_redone": chaos["epochs_redone"],
        "wall_s": {"undisturbed": round(undisturbed["wall_s"], 1), "chaos": round(chaos["wall_s"], 1)},
        "max_policy_lag": c.cluster.max_policy_lag,
        "lora_equal": equal,
        "error": chaos["error"],
    }
    json.dump(figures, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
