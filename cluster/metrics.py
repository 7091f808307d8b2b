"""Run metrics exported through Ray (`ray.util.metrics`, scraped by Prometheus from each node's
metrics endpoint, where they appear with Ray's `ray_` prefix: `ray_ddpo_reward_mean`, ...).
The Grafana dashboard in `cluster/grafana_dashboard.json` plots them; the driver puts it beside
Ray's own dashboards, where Grafana started with Ray's generated config finds it."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from ray.util.metrics import Counter, Gauge

from cluster.loop import TIMED_STAGES

DASHBOARD = Path(__file__).with_name("grafana_dashboard.json")
ROLES = ("sampler", "learner", "reward")
_COUNT_KEYS = {"sampler": "cluster.num_samplers", "learner": "cluster.num_learners",
               "reward": "cluster.num_reward_actors"}


def busy_summary(history: list[dict]) -> dict[str, float]:
    """Each role's busy fraction over a run's epochs (weighted by the epochs' wall time)."""
    seconds = sum(m["time_epoch_s"] for m in history)
    return {role: sum(m[f"busy_{role}"] * m["time_epoch_s"] for m in history) / seconds for role in ROLES}


def usage_line(history: list[dict]) -> str:
    """One line: the run's images per device-second and MFU (over its epochs' wall time), and
    its actors' memory at the end."""
    seconds = sum(m["time_epoch_s"] for m in history)
    per_device_s = sum(m["images_per_device_s"] * m["time_epoch_s"] for m in history) / seconds
    mfus = [m["mfu"] for m in history]
    mfu = f", MFU {sum(x * m['time_epoch_s'] for x, m in zip(mfus, history)) / seconds:.1%}" if None not in mfus else ""
    last = history[-1]
    gpu = f", GPU peak {last['actors_gpu_peak_bytes'] / 2**30:.2f} GiB" if last["actors_gpu_peak_bytes"] else ""
    return (f"throughput: {per_device_s:.3g} images per device-second{mfu}; actors' memory: "
            f"{last['actors_rss_bytes'] / 2**30:.2f} GiB resident{gpu}")


def stages_line(history: list[dict]) -> str:
    """One line: each stage's share of the epochs' wall time over a run's epochs (`eval` where
    the eval batch was scored), and the rest: writing the metrics line that holds the times, and
    its plots, which no stage times (see `cluster.loop.EpochLoop.run_epoch`)."""
    seconds = sum(m["time_epoch_s"] for m in history)
    stages = [stage for stage in TIMED_STAGES if any(f"time_{stage}_s" in m for m in history)]
    shares = {stage: sum(m.get(f"time_{stage}_s", 0.0) for m in history) / seconds for stage in stages}
    rest = max(0.0, 1.0 - sum(shares.values()))
    return (f"stages: {', '.join(f'{stage} {share:.0%}' for stage, share in shares.items())} of the epoch time; "
            f"the rest ({rest:.0%}) is the metrics lines and their plots")


def bottleneck_hint(busy: dict[str, float], layout: str, max_policy_lag: int) -> str | None:
    """One line naming the count to raise when the samplers or learners idle more than half the
    time (a reward actor that idles costs little: it holds no device); None when none does."""
    if layout == "colocated":  # a sampler and a learner share each device and take turns
        device = busy["sampler"] + busy["learner"]
        if device >= 0.5:
            return None
        if busy["reward"] > device:
            return (f"the devices idle {1 - device:.0%} of the time waiting for rewards (reward actors busy "
                    f"{busy['reward']:.0%}): raise cluster.num_reward_actors")
        return (f"the devices idle {1 - device:.0%} of the time: the driver holds the run up "
                "(see the stages line, and the time_*_s fields of metrics.jsonl)")
    idle = [role for role in ("sampler", "learner") if busy[role] < 0.5]
    if not idle:
        return None
    busiest = max(ROLES, key=lambda role: busy[role])
    waiting = ", ".join(f"{role}s idle {1 - busy[role]:.0%} of the time" for role in idle if role != busiest)
    line = f"{waiting}; {busiest}s are busy {busy[busiest]:.0%}: raise {_COUNT_KEYS[busiest]}"
    if max_policy_lag == 0:
        line += " (at max_policy_lag 0 samplers and learners take turns: cluster.layout colocated keeps both busy)"
    return line


def grafana_dashboards_dir(session_dir: Path) -> Path:
    """The folder that Ray's generated Grafana provisioning loads dashboards from
    (`<session dir>/metrics/grafana/provisioning/dashboards/default.yml` names it), found as
    Ray's dashboard finds it (ray/dashboard/modules/metrics/metrics_head.py), from the same
    environment variables."""
    root = os.environ.get("RAY_METRICS_OUTPUT_ROOT", os.path.join(session_dir, "metrics"))
    return Path(os.environ.get("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", os.path.join(root, "grafana", "dashboards")))


def install_grafana_dashboard(session_dir: Path) -> Path | None:
    """Copy the DDPO dashboard into Ray's Grafana dashboards folder, beside Ray's own, so that a
    Grafana started with Ray's generated `grafana.ini` lists it (folder "Ray", title "DDPO").
    Ray's dashboard writes that folder on the head node when it starts, clearing what was there:
    the driver, on the head node (a local run, `ray job submit`), copies it in after. Returns
    where it went; None where the folder is not on this node or Ray runs no dashboard."""
    folder = grafana_dashboards_dir(session_dir)
    if not folder.is_dir():
        return None
    target = folder / "ddpo_grafana_dashboard.json"
    partial = folder / f".{target.name}.partial"  # Grafana reads *.json: never a half-written one
    partial.write_bytes(DASHBOARD.read_bytes())
    os.replace(partial, target)
    return target


class ActorMetrics:
    """Busy seconds and idle ratio of one actor, tagged with its name and role, so that the
    bottleneck shows: the busiest role is the one holding the others up."""

    def __init__(self, actor: str, role: str):
        self.tags = {"actor": actor, "role": role}
        self.started = time.monotonic()
        self.busy = 0.0
        self.busy_total = Counter("ddpo_busy_seconds_total", "seconds spent working", tag_keys=("actor", "role"))
        self.idle_ratio = Gauge("ddpo_idle_ratio", "fraction of the actor's life spent waiting",
                                tag_keys=("actor", "role"))

    @contextmanager
    def working(self):
        """Count the time spent in the `with` block as busy."""
        start = time.monotonic()
        yield
        seconds = time.monotonic() - start
        self.busy += seconds
        self.busy_total.inc(seconds, tags=self.tags)
        self.idle_ratio.set(1.0 - self.busy / max(time.monotonic() - self.started, 1e-9), tags=self.tags)


class DriverMetrics:
    """The run's progress, one update per epoch, plus the queues during an epoch."""

    GAUGES = {
        "ddpo_policy_version": "LoRA version the learner has reached",
        "ddpo_policy_lag": "mean policy lag of the samples trained on",
        "ddpo_reward_mean": "mean reward of the epoch's samples",
        "ddpo_reward_std": "standard deviation of the epoch's rewards",
        "ddpo_approx_kl": "approximate KL of the update to the proximal policy",
        "ddpo_clipfrac": "fraction of ratios outside the clip range",
        "ddpo_loss": "mean training loss of the update",
        "ddpo_samples_per_second": "samples trained per second of the epoch",
        "ddpo_weight_sync_seconds": "seconds to put a LoRA version in the object store and hand it out",
        "ddpo_epoch_seconds": "wall seconds of the epoch, its stages' and the record's writes",
        "ddpo_images_per_device_s": "images sampled per device-second of the epoch",
        "ddpo_mfu": "the denoisers' model FLOPs utilization of the devices' peak (GPU)",
        "ddpo_actors_rss_bytes": "resident memory of the run's actors, summed",
        "ddpo_actors_gpu_peak_bytes": "peak GPU memory of the run's actors' tensors, summed",
        "ddpo_eval_reward_mean": "mean trained reward of the fixed eval batch (every eval_every epochs)",
        "ddpo_heldout_reward_mean": "mean held-out reward of the fixed eval batch (reward.heldout)",
    }

    def __init__(self):
        self.gauges = {name: Gauge(name, description) for name, description in self.GAUGES.items()}
        self.stage_seconds = Gauge("ddpo_stage_seconds", "seconds of the epoch's stage (cluster.loop)",
                                   tag_keys=("stage",))
        self.queue_depth = Gauge("ddpo_queue_depth", "tasks waiting in a queue", tag_keys=("queue",))
        self.busy_fraction = Gauge("ddpo_busy_fraction", "fraction of the epoch a role's actors spent working",
                                   tag_keys=("role",))
        self.samples = Counter("ddpo_samples_total", "samples trained on")
        self.dropped = Counter("ddpo_dropped_stale_batches_total", "sample batches dropped as too old")

    def queues(self, sampling: int, scoring: int) -> None:
        self.queue_depth.set(sampling, tags={"queue": "sample"})
        self.queue_depth.set(scoring, tags={"queue": "reward"})

    def epoch(self, metrics: dict) -> None:
        values = {
            "ddpo_policy_version": metrics["policy_version"],
            "ddpo_policy_lag": metrics["policy_lag_mean"],
            "ddpo_reward_mean": metrics["reward_mean"],
            "ddpo_reward_std": metrics["reward_std"],
            "ddpo_approx_kl": metrics["approx_kl"],
            "ddpo_clipfrac": metrics["clipfrac"],
            "ddpo_loss": metrics["loss"],
            "ddpo_samples_per_second": metrics["samples_per_s"],
            "ddpo_weight_sync_seconds": metrics["time_sync_s"],
            "ddpo_epoch_seconds": metrics["time_epoch_s"],
            "ddpo_images_per_device_s": metrics["images_per_device_s"],
            "ddpo_mfu": metrics["mfu"],
            "ddpo_actors_rss_bytes": metrics["actors_rss_bytes"],
            "ddpo_actors_gpu_peak_bytes": metrics["actors_gpu_peak_bytes"],
            "ddpo_eval_reward_mean": metrics.get("eval_reward_mean"),  # on evaluation epochs only
            "ddpo_heldout_reward_mean": metrics.get("heldout_reward_mean"),
        }
        for name, value in values.items():
            if value is not None and value == value:  # skip NaN (RWR has no KL or clipfrac) and None (no MFU on CPU)
                self.gauges[name].set(float(value))
        for role in ROLES:
            self.busy_fraction.set(metrics[f"busy_{role}"], tags={"role": role})
        for stage in TIMED_STAGES:  # eval: 0 on the epochs that do not score the eval batch
            self.stage_seconds.set(metrics.get(f"time_{stage}_s", 0.0), tags={"stage": stage})
        if metrics.get("num_samples"):
            self.samples.inc(metrics["num_samples"])
        if metrics["dropped_stale"]:
            self.dropped.inc(metrics["dropped_stale"])
