"""Local mode listens on loopback only: every listening socket of a `start_local_ray` instance's
processes (the driver, Ray's daemons, agents, workers, metrics servers) is on 127.0.0.1.

The instance runs in a subprocess (this process shares one Ray instance per test session)."""
import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import free_port, kill_leftovers

REPO = Path(__file__).resolve().parents[1]

# The driver: a local instance as `ddpo train` starts it (dashboard on), one actor; it writes
# `ready` once the actor answered and stops Ray when its stdin closes.
DRIVER = """
import sys
from pathlib import Path

import ray

from cluster.local import start_local_ray

start_local_ray(namespace="ddpo-loopback", include_dashboard=True, num_cpus=1, log_to_driver=False)


@ray.remote(num_cpus=0)
class Echo:
    def ping(self):
        return "pong"


echo = Echo.remote()  # held: the actor lives until Ray stops
assert ray.get(echo.ping.remote()) == "pong"
Path(sys.argv[1]).write_text("ready")
sys.stdin.read()
ray.shutdown()
"""

# Every process that listens on TCP, by title, and the sockets it holds: all must be there, so
# that a socket Ray failed to open (a port taken) does not pass for one on loopback.
LISTENERS = {
    "driver": "the driver's core worker gRPC server",
    "gcs_server": "the GCS gRPC server",
    "raylet": "the node manager and object manager gRPC servers",
    "ray::Echo": "the actor's core worker gRPC server",
    "ray::DashboardAgent": "its gRPC server, Prometheus metrics export, HTTP (52365, if free)",
    "ray::RuntimeEnvAgent": "its HTTP server",
    "dashboard.py": "the dashboard (8265) and its Prometheus metrics (DASHBOARD_METRIC_PORT, 44227)",
    "monitor.py": "the autoscaler's Prometheus metrics (AUTOSCALER_METRIC_PORT, 44217)",
}
# Sockets Ray 2.60 cannot be told to put on loopback, as {title: reason}: none. Should one
# appear after an upgrade, name it here with the reason and what a user does about it.
NOT_LOOPBACK = {}


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or IPv4 loopback in an IPv6 dual-stack socket (::ffff:127.0.0.1: gRPC's)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def title(proc: psutil.Process, driver_pid: int) -> str:
    if proc.pid == driver_pid:
        return "driver"
    argv = proc.cmdline()
    if argv and argv[0].startswith("ray::"):
        return argv[0].split()[0]
    script = next((arg for arg in argv[1:] if arg.endswith(".py")), argv[0] if argv else "?")
    return os.path.basename(script)


def listening_sockets(driver: psutil.Process) -> set:
    """(title, ip, port) of every listening TCP socket and bound UDP socket of the driver and its
    descendants."""
    found = set()
    for proc in [driver, *driver.children(recursive=True)]:
        try:
            name = title(proc, driver.pid)
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr):
                    found.add((name, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:  # it ended meanwhile
            pass
    return found


def stop(proc: subprocess.Popen) -> None:
    """Close the driver's stdin (it shuts Ray down); kill what is left of its tree."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    proc.stdin.close()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    kill_leftovers(tree)


def test_a_local_instance_listens_on_loopback_only(tmp_path):
    ready = tmp_path / "ready"
    metric_ports = {"DASHBOARD_METRIC_PORT": free_port(), "AUTOSCALER_METRIC_PORT": free_port()}
    # the fixed metrics ports moved to free ones, so that another Ray instance on the machine
    # (a parallel test's, a `ddpo train` run's) holding 44217/44227 does not keep them from opening
    env = {**os.environ, **{key: str(port) for key, port in metric_ports.items()},
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(ready)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.2)
        driver = psutil.Process(proc.pid)
        while True:  # the agents and metrics servers open their ports while the actor starts
            sockets = listening_sockets(driver)
            titles = {name for name, _, _ in sockets}
            metrics = {(name, port) for name, _, port in sockets}
            if (titles >= LISTENERS.keys() and ("dashboard.py", metric_ports["DASHBOARD_METRIC_PORT"]) in metrics
                    and ("monitor.py", metric_ports["AUTOSCALER_METRIC_PORT"]) in metrics) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        stop(proc)
        log.close()
    listing = "\n".join(f"{name} {ip}:{port}" for name, ip, port in sorted(sockets))
    assert titles >= LISTENERS.keys(), f"missing: {sorted(LISTENERS.keys() - titles)}\n{listing}"
    assert ("dashboard.py", metric_ports["DASHBOARD_METRIC_PORT"]) in metrics, listing
    assert ("monitor.py", metric_ports["AUTOSCALER_METRIC_PORT"]) in metrics, listing
    exposed = {(name, ip, port) for name, ip, port in sockets if not is_loopback(ip)}
    assert {name for name, _, _ in exposed} == NOT_LOOPBACK.keys(), f"not on loopback: {sorted(exposed)}\n{listing}"
