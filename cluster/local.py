"""A local single-node Ray instance (no --address) whose sockets listen on 127.0.0.1 only.

Ray 2.60 picks every bind address from the node's IP. With node IP 127.0.0.1 these listen on
loopback: the gRPC servers of the GCS, of the raylet (node manager, object manager) and of every
core worker (the driver, each actor, each idle worker), the dashboard agent's gRPC, HTTP (52365)
and Prometheus metrics-export ports, the runtime-env agent, the fixed Prometheus ports of the
autoscaler monitor (44217) and of the dashboard (44227), and the dashboard (`dashboard_host`).
With any other node IP they listen on all interfaces (`::`, `0.0.0.0`) or on that IP.

`ray.init(_node_ip_address="127.0.0.1")` alone does not give the node that IP: ray.init replaces
a loopback address with the machine's routable one (services.resolve_ip_for_localhost) unless
`ray_constants.ENABLE_RAY_CLUSTER` is off, as it is by default only on macOS and Windows (env
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once when Ray is imported). `start_local_ray` turns it
off for the duration of its ray.init only: the node keeps 127.0.0.1, and this process's later
`ray start` or cluster connection is unaffected. gRPC binds 127.0.0.1 through a dual-stack socket,
listed as `::ffff:127.0.0.1` (IPv4 loopback). What the run binds to the node's IP
(`ray.util.get_node_ip_address()`: the CPU learner group's gloo sockets) is on 127.0.0.1 too.

Ray leaves no listening socket off loopback (tests/test_main_job.py checks a live `ddpo train`).
Not Ray's: NCCL (a learner group on GPUs) picks its own interface, so `start_local_ray` sets
NCCL_SOCKET_IFNAME=lo (unless set) for the workers it starts (not yet run on GPUs here). Token authentication (RAY_AUTH_MODE) is unchanged. A cluster
(--address) is not started here: its nodes listen on their own IPs to reach each other.
"""
from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"


def start_local_ray(**ray_init_kwargs):
    """`ray.init(**ray_init_kwargs)` starting a new local instance (never RAY_ADDRESS's cluster)
    with every socket on 127.0.0.1, the dashboard's too if `include_dashboard`; returns
    ray.init's context."""
    import ray
    from ray._private import ray_constants

    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # Ray's processes inherit this process's environment
    cluster_enabled = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # ray.init then keeps _node_ip_address=127.0.0.1
    try:
        return ray.init(address="local", _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, **ray_init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_enabled
