"""One way into Ray (cluster/remote.py): `connect_ray` for every command that joins Ray,
`start_actor` for every actor the project starts."""

import re
from pathlib import Path

import pytest
import ray

from cluster.remote import connect_ray
from ddpo.errors import AddressError

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_a_port_that_answers_but_is_no_ray_cluster_is_one_line(monkeypatch):
    def no_cluster(**kwargs):
        raise ConnectionError("Could not read 'session_name' from GCS.\nDid the head node start?")

    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(AddressError) as info:
        connect_ray("10.1.2.3:6379", "RAY_ADDRESS", namespace="ddpo")
    assert str(info.value) == ("RAY_ADDRESS: cannot reach a Ray cluster at 10.1.2.3:6379 (Could not read "
                               "'session_name' from GCS.)")


def test_the_commands_join_ray_and_start_actors_in_one_place():
    """Outside cluster/remote.py (and cluster/local.py, the local instance it starts), no module
    of cluster/ calls ray.init, or makes an actor class with ray.remote."""
    for path in sorted(CLUSTER.glob("*.py")):
        if path.name in ("remote.py", "local.py"):
            continue
        source = path.read_text()
        assert not re.search(r"\bray\.init\(|start_local_ray\(|ray\.remote\(", source), path.name
