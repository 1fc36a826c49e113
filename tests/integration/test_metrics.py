"""Metrics end to end: a real Prometheus (Debian's) scrapes kata-monitor every second while two kata pods
made through containerd's CRI and a `docker run --runtime kata` container run; each sandbox has its series
(guest memory, hypervisor CPU), the pods' labelled with their CRI names; `kata-runtime metrics` prints one
sandbox's; once the sandboxes go, their series stop and kata-monitor serves on.

kata-monitor runs as tests.support.prometheus.kata_monitor_command() finds it: the installed command, or
`python -m kata.metrics.kata_monitor`.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kata.metrics.endpoint import fetch
from kata.sandbox.paths import SandboxPaths
from kata.utils import procfs
from tests.conftest import wait_for
from tests.support.cri import CriClient, Pod
from tests.support.cri_config import KATA
from tests.support.daemons import Containerd, Dockerd, kata_runtime_path
from tests.support.prometheus import PROMETHEUS, Monitor, Prometheus, kata_monitor, prometheus_server

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

CRI_RUNTIMES = {"kata": KATA}
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kata-dashboard.json"
TIMEOUT = 180


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[Monitor]:
    with kata_monitor(log=tmp_path / "kata-monitor.log") as m:
        yield m


@pytest.fixture
def prometheus(monitor: Monitor) -> Iterator[Prometheus]:
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip(f"{PROMETHEUS} is missing (scripts/install.sh installs Debian's prometheus)")
    with prometheus_server([monitor.address]) as prom:
        yield prom


def by_sandbox(prom: Prometheus, expr: str) -> dict[str, dict[str, Any]]:
    return {r["metric"].get("sandbox_id", ""): r for r in prom.query(expr)}


def agent_cpu_per_scrape(sock: Path, scrapes: int) -> float:
    """The agent's CPU seconds per GetMetrics, over ``scrapes`` scrapes of the sandbox's socket (and
    Prometheus's meanwhile, counted alike)."""
    from prometheus_client.parser import text_string_to_metric_families

    def figures() -> tuple[float, float]:
        found = {s.name: s.value for f in text_string_to_metric_families(fetch(sock, 10.0).decode())
                 for s in f.samples}
        return found["kata_agent_process_cpu_seconds_total"], found["kata_agent_scrape_count_total"]

    cpu0, n0 = figures()
    for _ in range(scrapes):
        fetch(sock, 10.0)
    cpu1, n1 = figures()
    return (cpu1 - cpu0) / (n1 - n0)


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"].replace("$sandbox", ".*") for p in dashboard["panels"] for t in p["targets"]]


def kata_runtime(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([kata_runtime_path(), *args], capture_output=True, text=True, timeout=60)


def test_prometheus_scrapes_every_sandbox_through_kata_monitor(
        cri: CriClient, cri_containerd: Containerd, docker: Dockerd, monitor: Monitor,
        prometheus: Prometheus) -> None:
    names = [f"metrics-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
    pods: list[Pod] = []
    container = ""
    try:
        for name in names:
            pods.append(cri.run_pod(name, "default", uuid.uuid4().hex[:12], "kata",
                                    cgroup_parent=cri_containerd.cgroup_parent))
        sleeper = cri.run_container(pods[0], "sleeper", cri_containerd.image, ["sleep", "100000"])
        run = docker.run("run", "-d", "--runtime", "kata", "--network", "none", docker.image,
                         "sleep", "100000", timeout=TIMEOUT)
        assert run.returncode == 0, run.stderr
        container = run.stdout.strip()
        sandboxes = {p.id: name for p, name in zip(pods, names, strict=True)} | {container: ""}

        # Prometheus has each sandbox's guest memory and hypervisor CPU, the pods' with their CRI names.
        def all_there() -> dict[str, dict[str, Any]] | None:
            memory = by_sandbox(prometheus, 'kata_guest_meminfo{item="mem_total"}')
            cpu = by_sandbox(prometheus, "kata_hypervisor_process_cpu_seconds_total")
            return memory if set(sandboxes) <= set(memory) and set(sandboxes) <= set(cpu) else None

        memory = wait_for(all_there, 90, "every sandbox's series in Prometheus")
        for sid, name in sandboxes.items():
            labels = memory[sid]["metric"]
            assert labels.get("cri_name", "") == name, labels
            assert float(memory[sid]["value"][1]) > 64 << 20  # the guest has its own memory (bytes)
            if name:
                assert labels["cri_namespace"] == "default" and labels["cri_uid"], labels
        cpu = by_sandbox(prometheus, "kata_hypervisor_process_cpu_seconds_total")
        assert all(float(cpu[sid]["value"][1]) > 0 for sid in sandboxes)
        # The pod's container has its guest cgroup's figures; virtiofsd and the serving process theirs.
        usage = prometheus.query(f'kata_guest_container_cpu_seconds_total{{container_id="{sleeper}",'
                                 'item="usage"}')
        assert [r["metric"]["sandbox_id"] for r in usage] == [pods[0].id]
        for family in ("kata_virtiofsd_process_pss_bytes", "kata_shim_process_resident_memory_bytes"):
            assert set(sandboxes) <= set(by_sandbox(prometheus, family)), family
        # Every query of the Grafana dashboard in deploy/ answers, over these sandboxes.
        for expr in dashboard_queries():
            wait_for(functools.partial(prometheus.query, expr), 30, f"the dashboard's {expr}")
        status, listed = monitor.get("/sandboxes")
        assert status == 200 and set(sandboxes) <= set(listed.split())

        serving = by_sandbox(prometheus, "kata_shim_process_pss_bytes")
        print("\nPSS of the process serving each sandbox, scraped: " + ", ".join(
            f"{'shim' if name else 'init monitor'} {float(serving[sid]['value'][1]) / 2**20:.1f} MB"
            for sid, name in sandboxes.items()))

        # One sandbox's figures from the command line; a bad or unknown id is one line.
        for sid in (pods[1].id, container):
            one = kata_runtime("metrics", sid)
            assert one.returncode == 0 and 'kata_guest_meminfo{item="mem_total"}' in one.stdout, one.stderr
        for bad in ("no/such", "nosuch"):
            refused = kata_runtime("metrics", bad)
            assert refused.returncode != 0 and refused.stdout == "", refused
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

        # What a scrape costs the guest: the agent's CPU time per GetMetrics it answers.
        per_scrape = agent_cpu_per_scrape(SandboxPaths(pods[1].id).metrics_socket, scrapes=30)
        print(f"\nagent CPU per scrape: {per_scrape * 1000:.1f} ms (TCG)")
        assert per_scrape < 0.05
    finally:
        for pod in pods:
            cri.remove_pod(pod.id)
        if container:
            docker.run("rm", "-f", container, timeout=TIMEOUT)

    # Their series stop; kata-monitor keeps answering Prometheus.
    gone = set(sandboxes)
    wait_for(lambda: not gone & set(by_sandbox(prometheus, "kata_guest_meminfo")), 30,
             "the removed sandboxes' series to stop")
    status, text = monitor.get("/metrics")
    assert status == 200 and "kata_monitor_running_shim_count" in text
    assert not gone & set(monitor.get("/sandboxes")[1].split())
    wait_for(lambda: monitor.address in prometheus.targets_up(), 10, "kata-monitor's target to be up")
    assert monitor.proc.poll() is None


def test_a_containers_monitor_serves_its_metrics_to_root_only(docker: Dockerd) -> None:
    """The runc path's init monitor serves the socket, root's only; it loads prometheus-client at its first
    scrape (what that costs it is printed)."""
    run = docker.run("run", "-d", "--runtime", "kata", "--network", "none", docker.image, "sleep", "1000",
                     timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr
    cid = run.stdout.strip()
    try:
        sock = SandboxPaths(cid).metrics_socket
        wait_for(sock.exists, 30, "the container's metrics socket")
        assert sock.stat().st_uid == 0 and sock.stat().st_mode & 0o077 == 0
        monitor = json.loads(docker.run("inspect", cid, timeout=30).stdout)[0]["State"]["Pid"]
        before = procfs.pss_bytes(monitor)
        assert b"kata_agent_scrape_count_total" in fetch(sock, 10.0)
        after = procfs.pss_bytes(monitor)
        assert before is not None and after is not None
        print(f"\nmonitor PSS before its first scrape {before / 2**20:.1f} MB, after {after / 2**20:.1f} MB")
        connect = f"import socket; socket.socket(socket.AF_UNIX).connect({json.dumps(str(sock))})"
        probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                "/usr/bin/python3", "-S", "-c", connect],
                               capture_output=True, text=True, timeout=30)
        assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe
    finally:
        docker.run("rm", "-f", cid, timeout=TIMEOUT)
