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


def test_the_dashboard_has_a_stable_uid_and_its_title():
    """Links to it (and Grafana's provisioning, which matches dashboards by uid) keep working."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert (dashboard["uid"], dashboard["title"]) == ("ddpo-ray", "DDPO")


def test_the_dashboard_goes_beside_rays_own_where_rays_provisioning_loads_them(tmp_path, monkeypatch):
    """Into `<session dir>/metrics/grafana/dashboards` when Ray's dashboard made it (or where
    Ray's environment variables move it); nowhere when there is none (a node that is not the
    head, a Ray without its dashboard)."""
    from cluster.metrics import install_grafana_dashboard

    for name in ["RAY_METRICS_OUTPUT_ROOT", "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"]:
        monkeypatch.delenv(name, raising=False)
    session = tmp_path / "session_x"
    assert install_grafana_dashboard(session) is None
    assert not session.exists()
    folder = session / "metrics" / "grafana" / "dashboards"
    folder.mkdir(parents=True)
    installed = install_grafana_dashboard(session)
    assert installed == folder / "ddpo_grafana_dashboard.json"
    assert installed.read_bytes() == DASHBOARD.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == [installed.name]  # no partial file left
    monkeypatch.setenv("RAY_METRICS_OUTPUT_ROOT", str(tmp_path / "root"))
    (tmp_path / "root" / "grafana" / "dashboards").mkdir(parents=True)
    assert install_grafana_dashboard(session) == tmp_path / "root" / "grafana" / "dashboards" / installed.name
    monkeypatch.setenv("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", str(tmp_path))
    assert install_grafana_dashboard(session) == tmp_path / installed.name
