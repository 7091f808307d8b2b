"""Run metrics exported through Ray (`ray.util.metrics`, scraped by Prometheus from each node's
metrics endpoint, where they appear with Ray's `ray_` prefix: `ray_ddpo_reward_mean`, ...).
The Grafana dashboard in `cluster/grafana_dashboard.json` plots them."""

from __future__ import annotations

import time
from contextlib import contextmanager

from ray.util.metrics import Counter, Gauge


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
    }

    def __init__(self):
        self.gauges = {name: Gauge(name, description) for name, description in self.GAUGES.items()}
        self.stage_seconds = Gauge("ddpo_stage_seconds", "seconds of the epoch's stage", tag_keys=("stage",))
        self.queue_depth = Gauge("ddpo_queue_depth", "tasks waiting in a queue", tag_keys=("queue",))
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
            "ddpo_weight_sync_seconds": metrics["time_broadcast_s"],
        }
        for name, value in values.items():
            if value is not None and value == value:  # skip NaN (RWR has no KL or clipfrac)
                self.gauges[name].set(float(value))
        for stage in ("sample", "reward", "train", "broadcast"):
            self.stage_seconds.set(metrics[f"time_{stage}_s"], tags={"stage": stage})
        if metrics.get("num_samples"):
            self.samples.inc(metrics["num_samples"])
        if metrics["dropped_stale"]:
            self.dropped.inc(metrics["dropped_stale"])
