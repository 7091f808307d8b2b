"""The Grafana dashboard plots every metric the run exports, under the names Ray exports."""

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "grafana_dashboard.json"


def _exported_names():
    source = (DASHBOARD.parent / "metrics.py").read_text()
    return set(re.findall(r'"(ddpo_[a-z_]+)"', source))


def test_dashboard_covers_every_exported_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    names = _exported_names()
    assert {"ddpo_reward_mean", "ddpo_busy_seconds_total", "ddpo_idle_ratio", "ddpo_queue_depth"} <= names
    for name in names:
        assert f"ray_{name}" in exprs, f"{name} is exported but not on the dashboard"
    for name in re.findall(r"ray_(ddpo_[a-z_]+)", exprs):
        assert name in names, f"the dashboard plots {name}, which nothing exports"
